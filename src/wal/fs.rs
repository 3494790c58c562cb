//! The filesystem seam: everything the WAL does to the disk goes through [`Fs`].
//!
//! [`RealFs`] is the production implementation (positional writes, `fdatasync`,
//! directory `fsync`). [`MemFs`] keeps files in memory and models what survives a
//! power cut: per file, only bytes present at the last `sync_data` are safe; a
//! directory entry created, renamed or removed after the last `sync_dir` of its
//! directory may be undone. It also injects faults (failed writes and syncs,
//! short writes, a full disk) so tests can drive the WAL into its error paths.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `ENOSPC` on Linux; used so a simulated full disk looks exactly like a real one.
const ENOSPC: i32 = 28;
/// `EIO` on Linux.
const EIO: i32 = 5;

/// How [`Fs::open`] treats an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Create the file, truncating it if it exists.
    Create,
    /// Open an existing file for reading and writing; fails if it is missing.
    Existing,
}

/// The directory operations the WAL needs. Paths are full paths.
pub trait Fs: Send + Sync + 'static {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// File names (not paths) directly inside `dir`, in no particular order.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>>;
    /// The whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Up to `len` bytes from `offset`; shorter at the end of the file.
    fn read_range(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    fn file_len(&self, path: &Path) -> io::Result<u64>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Makes creations, renames and removals inside `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// `(free, total)` bytes of the filesystem holding `path`, if known. Lets
    /// optional data (the stream history) give way before it takes the log's space.
    fn space(&self, _path: &Path) -> io::Result<Option<(u64, u64)>> {
        Ok(None)
    }
    /// Takes the directory for this process alone until the returned guard is
    /// dropped; an error of kind `WouldBlock` when another process holds it. The
    /// default (filesystems in memory, one process) takes nothing.
    fn lock_dir(&self, _dir: &Path) -> io::Result<DirLock> {
        Ok(DirLock(None))
    }
}

/// The name of the file [`RealFs::lock_dir`] locks inside the directory.
pub const LOCK_FILE: &str = "LOCK";

/// Held while a process uses a directory ([`Fs::lock_dir`]); dropping it (or the
/// process ending, however it ends) lets another take the directory.
#[derive(Debug)]
pub struct DirLock(#[allow(dead_code)] Option<File>);

/// An open file.
pub trait FsFile: Send {
    /// Writes all of `data` at `offset`, extending the file if needed.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// `fdatasync`: the file's data (and the size needed to read it) is durable on return.
    fn sync_data(&mut self) -> io::Result<()>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    fn size(&self) -> io::Result<u64>;
    /// Reserves real blocks up to `len` bytes, filled with zeros, so later writes in
    /// that range do not change the file's size or block map (an `fdatasync` then
    /// has no metadata to write). The default writes zeros, which works everywhere.
    fn allocate(&mut self, len: u64) -> io::Result<()> {
        const CHUNK: usize = 1 << 20;
        let zeros = vec![0u8; CHUNK];
        let mut at = self.size()?;
        while at < len {
            let n = (len - at).min(CHUNK as u64) as usize;
            self.write_at_paced(at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }
    /// [`FsFile::write_at`] for bulk data written beside the log (spare segments,
    /// snapshots): on a real disk it goes out in steps, each pushed to the device
    /// and waited for before the next, so the log's own syncs never queue behind
    /// more than one step. The default is a plain `write_at`.
    fn write_at_paced(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_at(offset, data)
    }
    /// [`FsFile::sync_data`] of a file written earlier without syncs (the stream
    /// history): on a real disk what is still unwritten goes out in steps, each waited
    /// for before the next, as [`FsFile::write_at_paced`] does. The default is a plain
    /// `sync_data`.
    fn sync_data_paced(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

struct RealFile(File);

impl FsFile for RealFile {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_all_at(data, offset)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    /// Writes in [`PACED_STEP`] steps, each pushed to the disk and waited for
    /// (`sync_file_range`) before the next, pausing after each as long as it took.
    /// An `fdatasync` of the log waits for everything already queued on the device,
    /// so bulk data written at once and synced at the end (a 64 MiB spare segment:
    /// ~60 ms of write-back on this project's VM; a snapshot of 240,000 open leads:
    /// 138 MB) held every acknowledgement in that window for as long; now a sync of
    /// the log waits behind one step at most, and the disk is left idle half of the
    /// time. The caller's final `sync_data` then finds almost nothing to write.
    #[cfg(target_os = "linux")]
    fn write_at_paced(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        let mut at = offset;
        for step in data.chunks(PACED_STEP) {
            let started = std::time::Instant::now();
            self.write_at(at, step)?;
            // SAFETY: a plain syscall on a file descriptor this value owns.
            if unsafe { libc::sync_file_range(self.0.as_raw_fd(), at as i64, step.len() as i64, flags) } != 0
            {
                return Err(io::Error::last_os_error());
            }
            at += step.len() as u64;
            std::thread::sleep(started.elapsed());
        }
        Ok(())
    }
    /// Pushes the file to the disk in [`PACED_STEP`] steps, each waited for, pausing
    /// after each as long as it took (a step already written back costs a syscall),
    /// then syncs what is left (the metadata).
    #[cfg(target_os = "linux")]
    fn sync_data_paced(&mut self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        let len = self.size()?;
        let mut at = 0;
        while at < len {
            let step = (len - at).min(PACED_STEP as u64);
            let started = std::time::Instant::now();
            // SAFETY: a plain syscall on a file descriptor this value owns.
            if unsafe { libc::sync_file_range(self.0.as_raw_fd(), at as i64, step as i64, flags) } != 0 {
                return Err(io::Error::last_os_error());
            }
            at += step;
            std::thread::sleep(started.elapsed());
        }
        self.sync_data()
    }
}

/// Bytes written (and pushed to the disk) per step of [`RealFile`]'s
/// `write_at_paced`: about 0.45 ms of this project's disk.
const PACED_STEP: usize = 256 << 10;

impl Fs for RealFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }
    /// `flock(LOCK_EX | LOCK_NB)` on `dir/LOCK`: advisory, released by the kernel
    /// when the process ends (a kill -9 included), so a stale lock cannot outlive it.
    fn lock_dir(&self, dir: &Path) -> io::Result<DirLock> {
        use std::os::fd::AsRawFd;
        let file =
            std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(LOCK_FILE))?;
        // SAFETY: a plain syscall on a file descriptor `file` owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(DirLock(Some(file)))
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Some(name) = entry.file_name().to_str() {
                    names.push(name.to_owned());
                }
            }
        }
        Ok(names)
    }
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if mode == OpenMode::Create {
            opts.create(true).truncate(true);
        }
        Ok(Box::new(RealFile(opts.open(path)?)))
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn read_range(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let n = file_len.saturating_sub(offset).min(len as u64) as usize;
        let mut buf = vec![0u8; n];
        file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
    fn file_len(&self, path: &Path) -> io::Result<u64> {
        Ok(std::fs::metadata(path)?.len())
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn space(&self, path: &Path) -> io::Result<Option<(u64, u64)>> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
        // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized,
        // writable statvfs struct that the call fills in.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let frag = st.f_frsize as u64;
        Ok(Some((st.f_bavail as u64 * frag, st.f_blocks as u64 * frag)))
    }
}

/// A one-shot fault armed on a [`MemFs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The next write fails with `EIO` and writes nothing.
    WriteError,
    /// The next write stores only the first half of its bytes, then fails with `EIO`.
    ShortWrite,
    /// The next sync fails with `EIO` and makes nothing durable.
    SyncError,
    /// The next `read` or `read_range` fails with `EMFILE`, as opening a file does
    /// while the process is out of file descriptors, and reads nothing.
    ReadError,
    /// The next `remove` fails with `EIO` and changes nothing.
    UnlinkError,
}

#[derive(Debug, Default, Clone)]
struct Inode {
    data: Vec<u8>,
    /// What a power cut leaves: the contents at the last successful `sync_data`.
    durable: Vec<u8>,
}

#[derive(Debug, Default, Clone)]
struct MemState {
    /// Incremented by every power cut; handles opened before it fail from then on,
    /// as the process that held them is gone.
    epoch: u64,
    next_inode: u64,
    dirs: HashSet<PathBuf>,
    /// The namespace as the running process sees it.
    names: BTreeMap<PathBuf, u64>,
    /// The namespace a power cut goes back to (as of each directory's last sync).
    durable_names: BTreeMap<PathBuf, u64>,
    inodes: BTreeMap<u64, Inode>,
    armed: Vec<Fault>,
    /// Bytes of file data the disk holds before writes fail with `ENOSPC`.
    capacity: Option<u64>,
    /// Random faults: (rng state, chance per write, chance per sync), in parts per million.
    random: Option<(u64, u32, u32)>,
    /// Seed for choosing how much unsynced data a power cut keeps.
    cut_rng: u64,
    syncs: u64,
    writes: u64,
    /// Mutating operations left before a scheduled power cut strikes.
    cut_countdown: Option<u64>,
    /// Syncs wait while a [`SyncHold`] lives.
    syncs_held: bool,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn eio(what: &str) -> io::Error {
    io::Error::new(io::Error::from_raw_os_error(EIO).kind(), format!("injected: {what}"))
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{} not found", path.display()))
}

impl MemState {
    fn used_bytes(&self) -> u64 {
        self.inodes.values().map(|i| i.data.len() as u64).sum()
    }

    fn take_fault(&mut self, is_sync: bool) -> Option<Fault> {
        let wanted = |f: &Fault| {
            !matches!(f, Fault::ReadError | Fault::UnlinkError) && (*f == Fault::SyncError) == is_sync
        };
        if let Some(i) = self.armed.iter().position(wanted) {
            return Some(self.armed.remove(i));
        }
        if let Some((state, write_ppm, sync_ppm)) = &mut self.random {
            let roll = (splitmix(state) % 1_000_000) as u32;
            if is_sync && roll < *sync_ppm {
                return Some(Fault::SyncError);
            }
            if !is_sync && roll < *write_ppm {
                return Some(if roll % 2 == 0 { Fault::WriteError } else { Fault::ShortWrite });
            }
        }
        None
    }

    /// An armed [`Fault::ReadError`], taken.
    fn take_read_fault(&mut self) -> io::Result<()> {
        match self.armed.iter().position(|f| *f == Fault::ReadError) {
            Some(i) => {
                self.armed.remove(i);
                Err(io::Error::from_raw_os_error(libc::EMFILE))
            }
            None => Ok(()),
        }
    }

    /// An armed [`Fault::UnlinkError`], taken.
    fn take_unlink_fault(&mut self) -> io::Result<()> {
        match self.armed.iter().position(|f| *f == Fault::UnlinkError) {
            Some(i) => {
                self.armed.remove(i);
                Err(eio("unlink failed"))
            }
            None => Ok(()),
        }
    }

    fn power_cut(&mut self) {
        let st = self;
        st.epoch += 1;
        st.names = st.durable_names.clone();
        let live: HashSet<u64> = st.names.values().copied().collect();
        st.inodes.retain(|id, _| live.contains(id));
        let mut rng = st.cut_rng;
        for file in st.inodes.values_mut() {
            let first_diff = file
                .data
                .iter()
                .zip(file.durable.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(file.data.len().min(file.durable.len()));
            let longest = file.data.len().max(file.durable.len());
            let span = (longest - first_diff) as u64;
            // Half the time nothing unsynced survives; otherwise a random prefix does.
            let r = splitmix(&mut rng);
            let keep = if span == 0 || r % 2 == 0 { 0 } else { (r >> 1) % (span + 1) } as usize;
            let mut after = file.durable.clone();
            let cut = first_diff + keep;
            if after.len() < cut.min(file.data.len()) {
                after.resize(cut.min(file.data.len()), 0);
            }
            let upto = cut.min(file.data.len());
            after[first_diff..upto].copy_from_slice(&file.data[first_diff..upto]);
            file.data = after.clone();
            file.durable = after;
        }
        st.cut_rng = rng;
        st.armed.clear();
        st.random = None;
    }

    /// Counts a mutating operation towards a scheduled power cut.
    fn tick(&mut self) -> io::Result<()> {
        if let Some(left) = self.cut_countdown {
            if left <= 1 {
                self.cut_countdown = None;
                self.power_cut();
                return Err(eio("power cut"));
            }
            self.cut_countdown = Some(left - 1);
        }
        Ok(())
    }

    fn inode_of(&self, path: &Path) -> io::Result<u64> {
        self.names.get(path).copied().ok_or_else(|| not_found(path))
    }
}

/// While alive, the [`MemFs`] it came from holds every sync ([`MemFs::hold_syncs`]).
#[derive(Debug)]
pub struct SyncHold {
    state: Arc<Mutex<MemState>>,
}

impl Drop for SyncHold {
    fn drop(&mut self) {
        self.state.lock().syncs_held = false;
    }
}

/// An in-memory filesystem with power cuts and fault injection. Clones share state.
#[derive(Debug, Clone, Default)]
pub struct MemFs {
    state: Arc<Mutex<MemState>>,
    /// Set on process handles: the epoch they belong to.
    bound_epoch: Option<u64>,
}

struct MemFile {
    state: Arc<Mutex<MemState>>,
    inode: u64,
    epoch: u64,
}

impl MemFile {
    fn with<R>(&self, f: impl FnOnce(&mut MemState) -> io::Result<R>) -> io::Result<R> {
        let mut st = self.state.lock();
        if st.epoch != self.epoch {
            return Err(eio("file handle from before a power cut"));
        }
        f(&mut st)
    }
}

impl FsFile for MemFile {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let inode = self.inode;
        self.with(|st| {
            st.tick()?;
            st.writes += 1;
            let fault = st.take_fault(false);
            if fault == Some(Fault::WriteError) {
                return Err(eio("write failed"));
            }
            let mut n = data.len();
            if fault == Some(Fault::ShortWrite) {
                n /= 2;
            }
            let mut full = false;
            if let Some(cap) = st.capacity {
                let cur_len = st.inodes[&inode].data.len() as u64;
                let grows = (offset + n as u64).saturating_sub(cur_len);
                let free = cap.saturating_sub(st.used_bytes());
                if grows > free {
                    n = (n as u64 - (grows - free)) as usize;
                    full = true;
                }
            }
            let file = st.inodes.get_mut(&inode).ok_or_else(|| eio("inode gone"))?;
            let end = offset as usize + n;
            if file.data.len() < end {
                file.data.resize(end, 0);
            }
            file.data[offset as usize..end].copy_from_slice(&data[..n]);
            if full {
                return Err(io::Error::from_raw_os_error(ENOSPC));
            }
            if fault == Some(Fault::ShortWrite) {
                return Err(eio("short write"));
            }
            Ok(())
        })
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let inode = self.inode;
        while self.state.lock().syncs_held {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        self.with(|st| {
            st.tick()?;
            if st.take_fault(true).is_some() {
                return Err(eio("sync failed"));
            }
            st.syncs += 1;
            let file = st.inodes.get_mut(&inode).ok_or_else(|| eio("inode gone"))?;
            file.durable.clone_from(&file.data);
            Ok(())
        })
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let inode = self.inode;
        self.with(|st| {
            st.tick()?;
            let file = st.inodes.get_mut(&inode).ok_or_else(|| eio("inode gone"))?;
            file.data.resize(len as usize, 0);
            Ok(())
        })
    }

    fn size(&self) -> io::Result<u64> {
        let inode = self.inode;
        self.with(|st| Ok(st.inodes.get(&inode).map_or(0, |f| f.data.len() as u64)))
    }

    /// Like `fallocate`: refused with `ENOSPC`, changing nothing, when the growth does
    /// not fit in [`MemFs::set_capacity`].
    fn allocate(&mut self, len: u64) -> io::Result<()> {
        let inode = self.inode;
        let fits = self.with(|st| {
            let cur_len = st.inodes.get(&inode).map_or(0, |f| f.data.len() as u64);
            Ok(st
                .capacity
                .is_none_or(|cap| len.saturating_sub(cur_len) <= cap.saturating_sub(st.used_bytes())))
        })?;
        if !fits {
            return Err(io::Error::from_raw_os_error(ENOSPC));
        }
        if self.size()? < len {
            self.set_len(len)?;
        }
        Ok(())
    }
}

impl MemFs {
    pub fn new() -> Self {
        Self::default()
    }

    /// An independent copy of the current state (faults and all).
    pub fn deep_clone(&self) -> MemFs {
        MemFs { state: Arc::new(Mutex::new(self.state.lock().clone())), bound_epoch: None }
    }

    /// Arms a one-shot fault for the next matching operation.
    pub fn inject(&self, fault: Fault) {
        self.state.lock().armed.push(fault);
    }

    /// Holds every sync (the syncing thread waits) until the returned guard drops:
    /// lets a test act while records are written but not yet durable.
    pub fn hold_syncs(&self) -> SyncHold {
        self.state.lock().syncs_held = true;
        SyncHold { state: self.state.clone() }
    }

    /// Disk capacity in bytes of file data; writes past it fail with `ENOSPC` after
    /// storing what fits. `None` means unlimited.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.state.lock().capacity = bytes;
    }

    /// Random faults from a seed: each write fails (or is short) with probability
    /// `write_ppm / 1e6`, each sync with `sync_ppm / 1e6`.
    pub fn set_random_faults(&self, seed: u64, write_ppm: u32, sync_ppm: u32) {
        self.state.lock().random = Some((seed, write_ppm, sync_ppm));
    }

    /// Clears every armed, random and capacity fault.
    pub fn clear_faults(&self) {
        let mut st = self.state.lock();
        st.armed.clear();
        st.random = None;
        st.capacity = None;
    }

    /// Seeds the choice of how much unsynced data a power cut keeps.
    pub fn set_cut_seed(&self, seed: u64) {
        self.state.lock().cut_rng = seed;
    }

    /// Successful `sync_data` calls so far.
    pub fn sync_count(&self) -> u64 {
        self.state.lock().syncs
    }

    /// Bytes of file data currently held (what [`MemFs::set_capacity`] limits).
    pub fn used_bytes(&self) -> u64 {
        self.state.lock().used_bytes()
    }

    /// Write calls so far.
    pub fn write_count(&self) -> u64 {
        self.state.lock().writes
    }

    /// Simulates losing power and rebooting. Per file, data written after its last
    /// `sync_data` is lost, except that a random prefix of it may have reached the
    /// disk (a torn write; bytes land in order, as appends do). Directory entries
    /// go back to their state at the directory's last `sync_dir`. Every handle open
    /// before the cut fails from now on.
    pub fn power_cut(&self) {
        self.state.lock().power_cut();
    }

    /// Schedules a power cut: the `ops`-th mutating operation from now (write, sync,
    /// truncate, create, rename, remove) does not happen; the power goes out instead
    /// and the operation fails. Lands cuts between a write and its sync.
    pub fn cut_power_after(&self, ops: u64) {
        self.state.lock().cut_countdown = Some(ops.max(1));
    }

    /// Power cuts so far.
    pub fn power_cuts(&self) -> u64 {
        self.state.lock().epoch
    }

    /// A handle for one "process": once the power is cut, every operation through
    /// it fails, as the process that held it is gone. Give each `Wal` its own.
    pub fn process_handle(&self) -> MemFs {
        MemFs { state: self.state.clone(), bound_epoch: Some(self.state.lock().epoch) }
    }

    /// The current contents of a file (test helper).
    pub fn file_bytes(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.read(path)
    }

    /// Overwrites a file's contents, durably (test helper for corruption).
    pub fn put_file(&self, path: &Path, bytes: &[u8]) {
        let mut st = self.state.lock();
        let id = match st.names.get(path) {
            Some(id) => *id,
            None => {
                st.next_inode += 1;
                let id = st.next_inode;
                st.names.insert(path.to_path_buf(), id);
                st.durable_names.insert(path.to_path_buf(), id);
                id
            }
        };
        st.inodes.insert(id, Inode { data: bytes.to_vec(), durable: bytes.to_vec() });
    }

    /// Flips one bit of a file, durably (test helper).
    pub fn flip_bit(&self, path: &Path, offset: u64, bit: u8) -> io::Result<()> {
        let mut bytes = self.read(path)?;
        let byte = bytes
            .get_mut(offset as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset past end"))?;
        *byte ^= 1 << (bit % 8);
        self.put_file(path, &bytes);
        Ok(())
    }

    /// Truncates a file durably (test helper).
    pub fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        let mut bytes = self.read(path)?;
        bytes.truncate(len as usize);
        self.put_file(path, &bytes);
        Ok(())
    }
}

impl MemFs {
    /// The state, if this handle's process is still alive.
    fn live(&self) -> io::Result<parking_lot::MutexGuard<'_, MemState>> {
        let st = self.state.lock();
        match self.bound_epoch {
            Some(e) if e != st.epoch => Err(eio("process handle from before a power cut")),
            _ => Ok(st),
        }
    }
}

impl Fs for MemFs {
    fn space(&self, _path: &Path) -> io::Result<Option<(u64, u64)>> {
        let st = self.live()?;
        Ok(st.capacity.map(|cap| (cap.saturating_sub(st.used_bytes()), cap)))
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.live()?;
        for anc in dir.ancestors() {
            st.dirs.insert(anc.to_path_buf());
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = self.live()?;
        if !st.dirs.contains(dir) {
            return Err(not_found(dir));
        }
        Ok(st
            .names
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
            .collect())
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
        let mut st = self.live()?;
        let parent = path.parent().unwrap_or(Path::new(""));
        if !st.dirs.contains(parent) {
            return Err(not_found(parent));
        }
        let inode = match (mode, st.names.get(path).copied()) {
            (OpenMode::Existing, Some(id)) => id,
            (OpenMode::Existing, None) => return Err(not_found(path)),
            (OpenMode::Create, Some(id)) => {
                let file = st.inodes.get_mut(&id).ok_or_else(|| eio("inode gone"))?;
                file.data.clear();
                id
            }
            (OpenMode::Create, None) => {
                st.tick()?;
                st.next_inode += 1;
                let id = st.next_inode;
                st.inodes.insert(id, Inode::default());
                st.names.insert(path.to_path_buf(), id);
                id
            }
        };
        Ok(Box::new(MemFile { state: self.state.clone(), inode, epoch: st.epoch }))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut st = self.live()?;
        st.take_read_fault()?;
        let id = st.inode_of(path)?;
        Ok(st.inodes[&id].data.clone())
    }

    fn read_range(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut st = self.live()?;
        st.take_read_fault()?;
        let id = st.inode_of(path)?;
        let data = &st.inodes[&id].data;
        let start = (offset as usize).min(data.len());
        let end = start.saturating_add(len).min(data.len());
        Ok(data[start..end].to_vec())
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        let st = self.live()?;
        let id = st.inode_of(path)?;
        Ok(st.inodes[&id].data.len() as u64)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.live()?;
        st.tick()?;
        let id = st.names.remove(from).ok_or_else(|| not_found(from))?;
        if let Some(old) = st.names.insert(to.to_path_buf(), id) {
            if !st.durable_names.values().any(|v| *v == old) {
                st.inodes.remove(&old);
            }
        }
        Ok(())
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut st = self.live()?;
        st.tick()?;
        st.take_unlink_fault()?;
        st.names.remove(path).ok_or_else(|| not_found(path))?;
        // The inode stays until a power cut or dir sync decides whether the name is gone.
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut st = self.live()?;
        st.tick()?;
        if st.take_fault(true).is_some() {
            return Err(eio("directory sync failed"));
        }
        st.durable_names.retain(|p, _| p.parent() != Some(dir));
        let entries: Vec<(PathBuf, u64)> = st
            .names
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .map(|(p, id)| (p.clone(), *id))
            .collect();
        st.durable_names.extend(entries);
        // Inodes no name refers to any more are gone for good.
        let referenced: HashSet<u64> = st.names.values().chain(st.durable_names.values()).copied().collect();
        st.inodes.retain(|id, _| referenced.contains(id));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_allocate_and_paced_writes_write_every_byte_and_keep_what_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg");
        let mut f = RealFs.open(&path, OpenMode::Create).unwrap();
        f.write_at(0, b"header").unwrap();
        // Not a multiple of the step: the last step is a short one.
        let len = (5 * PACED_STEP + 12_345) as u64;
        f.allocate(len).unwrap();
        assert_eq!(f.size().unwrap(), len);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..6], b"header");
        assert!(bytes[6..].iter().all(|&b| b == 0), "the rest is zeros");
        // Already long enough: nothing is written.
        f.write_at(len - 1, b"x").unwrap();
        f.allocate(len).unwrap();
        assert_eq!(std::fs::read(&path).unwrap()[len as usize - 1], b'x');
        // A paced write lands every byte where a plain one would.
        let data: Vec<u8> = (0..3 * PACED_STEP + 77).map(|i| (i % 251) as u8).collect();
        f.write_at_paced(100, &data).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[100..100 + data.len()], &data[..]);
        assert_eq!(&bytes[..6], b"header");
        assert!(bytes[100 + data.len()..len as usize - 1].iter().all(|&b| b == 0));
    }

    #[test]
    fn memfs_power_cut_keeps_synced_data_and_synced_names_only() {
        let fs = MemFs::new();
        let dir = Path::new("/d");
        fs.create_dir_all(dir).unwrap();
        let a = dir.join("a");
        let mut f = fs.open(&a, OpenMode::Create).unwrap();
        f.write_at(0, b"hello").unwrap();
        f.sync_data().unwrap();
        fs.sync_dir(dir).unwrap();
        f.write_at(5, b" world").unwrap();
        let mut g = fs.open(&dir.join("b"), OpenMode::Create).unwrap();
        g.write_at(0, b"x").unwrap();
        g.sync_data().unwrap();
        fs.set_cut_seed(2); // even first roll: nothing unsynced survives
        fs.power_cut();
        let data = fs.read(&a).unwrap();
        assert!(data.starts_with(b"hello") && b"hello world".starts_with(&data[..]));
        assert!(fs.read(&dir.join("b")).is_err(), "unsynced dir entry must vanish");
        assert!(f.write_at(0, b"z").is_err(), "old handles die with the process");
    }

    #[test]
    fn memfs_disk_full_stores_what_fits_then_fails_with_enospc() {
        let fs = MemFs::new();
        fs.create_dir_all(Path::new("/d")).unwrap();
        fs.set_capacity(Some(4));
        let mut f = fs.open(Path::new("/d/a"), OpenMode::Create).unwrap();
        let err = f.write_at(0, b"123456").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(ENOSPC));
        assert_eq!(fs.read(Path::new("/d/a")).unwrap(), b"1234");
    }
}
