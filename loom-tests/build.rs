// The core's sync facade (src/sync.rs) switches to loom's atomics under this cfg. It is set
// here, for this crate only, so that `--cfg loom` never reaches loom-aware dependencies.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(memgroup_loom)");
    println!("cargo::rustc-cfg=memgroup_loom");
}
