/work/main/balancer-ebpf/target/ebpf/release/deps/aya_build-d232efa9fda21afe.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/aya-build-0.2.0/src/lib.rs

/work/main/balancer-ebpf/target/ebpf/release/deps/libaya_build-d232efa9fda21afe.rlib: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/aya-build-0.2.0/src/lib.rs

/work/main/balancer-ebpf/target/ebpf/release/deps/libaya_build-d232efa9fda21afe.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/aya-build-0.2.0/src/lib.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/aya-build-0.2.0/src/lib.rs:
