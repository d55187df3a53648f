/work/main/balancer-ebpf/target/ebpf/bpfel-unknown-none/release/deps/aya_ebpf_cty-1ccbe99e2635db4e.d: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/aya-ebpf-cty-0.3.0/src/lib.rs

/work/main/balancer-ebpf/target/ebpf/bpfel-unknown-none/release/deps/libaya_ebpf_cty-1ccbe99e2635db4e.rlib: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/aya-ebpf-cty-0.3.0/src/lib.rs

/work/main/balancer-ebpf/target/ebpf/bpfel-unknown-none/release/deps/libaya_ebpf_cty-1ccbe99e2635db4e.rmeta: /root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/aya-ebpf-cty-0.3.0/src/lib.rs

/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/aya-ebpf-cty-0.3.0/src/lib.rs:
