//! Fails early, with the fix, when the BPF linker is missing; and rebuilds when it changes.
fn main() {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file());
    match found {
        Some(path) => println!("cargo:rerun-if-changed={}", path.display()),
        None => panic!("bpf-linker not found on PATH: run `cargo xtask setup`"),
    }
}
