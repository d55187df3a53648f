/work/main/balancer-ebpf/target/ebpf/release/deps/rustc_version-d677ea11a9a6c260.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/rustc_version-0.4.1/src/lib.rs

/work/main/balancer-ebpf/target/ebpf/release/deps/librustc_version-d677ea11a9a6c260.rlib: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/rustc_version-0.4.1/src/lib.rs

/work/main/balancer-ebpf/target/ebpf/release/deps/librustc_version-d677ea11a9a6c260.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/rustc_version-0.4.1/src/lib.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/rustc_version-0.4.1/src/lib.rs:
