/work/main/balancer-ebpf/target/ebpf/release/deps/cargo_platform-d46832c2d2c4c226.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/cargo-platform-0.3.3/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/cargo-platform-0.3.3/src/cfg.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/cargo-platform-0.3.3/src/error.rs

/work/main/balancer-ebpf/target/ebpf/release/deps/libcargo_platform-d46832c2d2c4c226.rlib: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/cargo-platform-0.3.3/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/cargo-platform-0.3.3/src/cfg.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/cargo-platform-0.3.3/src/error.rs

/work/main/balancer-ebpf/target/ebpf/release/deps/libcargo_platform-d46832c2d2c4c226.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/cargo-platform-0.3.3/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/cargo-platform-0.3.3/src/cfg.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/cargo-platform-0.3.3/src/error.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/cargo-platform-0.3.3/src/lib.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/cargo-platform-0.3.3/src/cfg.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/cargo-platform-0.3.3/src/error.rs:
