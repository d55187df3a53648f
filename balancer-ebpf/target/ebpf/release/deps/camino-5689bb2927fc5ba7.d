/work/main/balancer-ebpf/target/ebpf/release/deps/camino-5689bb2927fc5ba7.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/camino-1.2.6/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/camino-1.2.6/src/serde_impls.rs

/work/main/balancer-ebpf/target/ebpf/release/deps/libcamino-5689bb2927fc5ba7.rlib: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/camino-1.2.6/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/camino-1.2.6/src/serde_impls.rs

/work/main/balancer-ebpf/target/ebpf/release/deps/libcamino-5689bb2927fc5ba7.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/camino-1.2.6/src/lib.rs /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/camino-1.2.6/src/serde_impls.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/camino-1.2.6/src/lib.rs:
/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/camino-1.2.6/src/serde_impls.rs:
