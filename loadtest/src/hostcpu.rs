//! How busy the machine was while the tool sent: the load tool shares the machine
//! with the daemon under test (on a 2-core host, the same two cores), so its figures
//! mean little without knowing whether the cores were saturated, how much of them the
//! tool itself took, and whether the hypervisor took time away (steal).
//!
//! Read from `/proc/stat` (all CPUs) and `/proc/self/stat` (this process) at the start
//! and the end of the timed phase; both count in the same clock ticks, so the tool's
//! share is its ticks over the ticks that passed per CPU. Where `/proc` is missing
//! (not Linux) the summary simply has no `host` entry.

use serde::{Deserialize, Serialize};

/// Counters at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuSample {
    /// Sum of every state's ticks over all CPUs.
    total: u64,
    /// Idle and I/O wait ticks.
    idle: u64,
    /// Ticks the hypervisor ran something else while a CPU wanted to run.
    steal: u64,
    cpus: u32,
    /// This process's user + system ticks.
    own: u64,
}

/// The machine between two samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostCpu {
    pub cpus: u32,
    /// Cores busy on average (any process), out of `cpus`.
    pub busy_cores: f64,
    /// Cores this tool used on average.
    pub tool_cores: f64,
    /// Cores everything else used (the daemon under test, if it runs here).
    pub others_cores: f64,
    /// Share of the CPUs' time the hypervisor took away, percent.
    pub steal_pct: f64,
}

pub fn sample() -> Option<CpuSample> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    let (total, idle, steal, cpus) = parse_proc_stat(&stat)?;
    Some(CpuSample { total, idle, steal, cpus, own: parse_self_ticks(&own)? })
}

/// `(total, idle + iowait, steal, number of CPUs)` from `/proc/stat`.
fn parse_proc_stat(text: &str) -> Option<(u64, u64, u64, u32)> {
    let mut lines = text.lines();
    let first = lines.next()?;
    let mut f = first.split_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
    // already counted in user, so only the first eight are summed.
    let v: Vec<u64> = f.take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    if v.len() < 4 {
        return None;
    }
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let cpus = text
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    Some((v.iter().sum(), at(3) + at(4), at(7), u32::try_from(cpus).ok().filter(|&n| n > 0)?))
}

/// utime + stime from `/proc/self/stat` (fields 14 and 15; the command name in
/// parentheses may hold spaces, so counting starts after its closing parenthesis).
fn parse_self_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ")" come field 3 (state) onwards: utime is field 14, index 11 here.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The machine's load between `a` and `b`, or `None` if no time passed.
pub fn between(a: &CpuSample, b: &CpuSample) -> Option<HostCpu> {
    let total = b.total.checked_sub(a.total).filter(|&t| t > 0)? as f64;
    let cpus = f64::from(b.cpus);
    let per_cpu = total / cpus;
    let idle = b.idle.saturating_sub(a.idle) as f64;
    let steal = b.steal.saturating_sub(a.steal) as f64;
    let busy = ((total - idle - steal) / per_cpu).max(0.0);
    let tool = (b.own.saturating_sub(a.own) as f64 / per_cpu).min(busy);
    Some(HostCpu {
        cpus: b.cpus,
        busy_cores: busy,
        tool_cores: tool,
        others_cores: busy - tool,
        steal_pct: 100.0 * steal / total,
    })
}

impl HostCpu {
    /// One line for the report, with a warning when the figures are suspect.
    pub fn describe(&self, tool_threads: usize) -> String {
        let mut s = format!(
            "host: {} CPU(s), {:.2} busy while sending (this tool {:.2}, everything else {:.2}), steal {:.1}%",
            self.cpus, self.busy_cores, self.tool_cores, self.others_cores, self.steal_pct
        );
        let threads = tool_threads.max(1) as f64;
        if self.tool_cores > 0.85 * threads.min(f64::from(self.cpus)) {
            s.push_str(&format!(
                "\nwarning: the tool used {:.2} of its {} thread(s): it may be the bottleneck (see `send lag`)",
                self.tool_cores, tool_threads
            ));
        }
        if self.busy_cores > 0.95 * f64::from(self.cpus) {
            s.push_str("\nwarning: the machine was saturated: latency includes waiting for a core");
        }
        if self.steal_pct > 5.0 {
            s.push_str("\nwarning: the hypervisor took more than 5% of the CPU time (steal)");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  4061627 5380 763431 4282623 67087 0 54325 4467 0 0\n\
cpu0 2030000 2690 381000 2141000 33000 0 27000 2200 0 0\n\
cpu1 2031627 2690 382431 2141623 34087 0 27325 2267 0 0\n\
intr 1 2 3\nctxt 99\n";

    #[test]
    fn proc_stat_sums_the_states_and_counts_the_cpus() {
        let (total, idle, steal, cpus) = parse_proc_stat(STAT).unwrap();
        assert_eq!(total, 4061627 + 5380 + 763431 + 4282623 + 67087 + 54325 + 4467);
        assert_eq!(idle, 4282623 + 67087);
        assert_eq!(steal, 4467);
        assert_eq!(cpus, 2);
        assert_eq!(parse_proc_stat("intr 1 2\n"), None);
        assert_eq!(parse_proc_stat("cpu 1 x 3 4\ncpu0 1 2 3 4\n"), None);
    }

    #[test]
    fn own_ticks_are_read_after_a_command_name_with_spaces_and_parentheses() {
        let line = "4242 (rota (load) tool) S 1 4242 4242 0 -1 4194560 100 0 0 0 731 96 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_self_ticks(line), Some(731 + 96));
        assert_eq!(parse_self_ticks("no parenthesis"), None);
    }

    #[test]
    fn the_split_between_tool_and_others_follows_the_ticks() {
        // 2 CPUs, 200 ticks per CPU passed: 400 in all, 100 idle, 20 stolen, the tool
        // took 60: 280 busy ticks = 1.4 cores, the tool 0.3, the rest 1.1.
        let a = CpuSample { total: 1000, idle: 500, steal: 10, cpus: 2, own: 40 };
        let b = CpuSample { total: 1400, idle: 600, steal: 30, cpus: 2, own: 100 };
        let h = between(&a, &b).unwrap();
        assert!((h.busy_cores - 1.4).abs() < 1e-9, "{h:?}");
        assert!((h.tool_cores - 0.3).abs() < 1e-9, "{h:?}");
        assert!((h.others_cores - 1.1).abs() < 1e-9, "{h:?}");
        assert!((h.steal_pct - 5.0).abs() < 1e-9, "{h:?}");
        assert_eq!(between(&a, &a), None, "no time passed");
        let d = h.describe(1);
        assert!(!d.contains("warning"), "{d}");
        let busy =
            HostCpu { cpus: 2, busy_cores: 1.98, tool_cores: 0.95, others_cores: 1.03, steal_pct: 6.0 };
        let d = busy.describe(1);
        assert!(d.contains("may be the bottleneck") && d.contains("saturated") && d.contains("steal"), "{d}");
    }

    #[test]
    fn this_machine_can_be_sampled() {
        // Linux CI: /proc is there; the sample must parse.
        if std::path::Path::new("/proc/stat").exists() {
            let a = sample().expect("readable /proc");
            assert!(a.cpus >= 1 && a.total > 0);
        }
    }
}
