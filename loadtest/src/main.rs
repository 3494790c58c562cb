fn main() { eprintln!("rota-loadtest: not yet implemented"); std::process::exit(2); }
