//! The daemon's configuration file (`rota.toml`): loading must answer with an error
//! naming what is wrong, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(data).expect("write");
    let src = rota::config::Sources { file: Some(file.path().to_path_buf()), ..Default::default() };
    let _ = rota::config::Config::load(&src);
});
