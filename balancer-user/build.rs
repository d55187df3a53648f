//! Embeds the XDP object that `cargo xtask build` compiled for bpfel-unknown-none.

use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=BALANCER_EBPF_OBJECT");
    let object = env::var_os("BALANCER_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/ebpf/bpfel-unknown-none/release/balancer-ebpf")
        });
    if !object.exists() {
        panic!(
            "the XDP object {} does not exist: build through `cargo xtask build` \
             (or `cargo xtask run` / `cargo xtask test`), which compiles it first",
            object.display()
        );
    }
    println!("cargo:rerun-if-changed={}", object.display());
    println!("cargo:rustc-env=BALANCER_EBPF_OBJECT={}", object.display());
}
