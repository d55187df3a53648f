/work/main/balancer-ebpf/target/ebpf/bpfel-unknown-none/release/deps/balancer_common-67ed0d9ea4de06b1.d: balancer-common/src/lib.rs balancer-common/src/csum.rs

/work/main/balancer-ebpf/target/ebpf/bpfel-unknown-none/release/deps/libbalancer_common-67ed0d9ea4de06b1.rlib: balancer-common/src/lib.rs balancer-common/src/csum.rs

/work/main/balancer-ebpf/target/ebpf/bpfel-unknown-none/release/deps/libbalancer_common-67ed0d9ea4de06b1.rmeta: balancer-common/src/lib.rs balancer-common/src/csum.rs

balancer-common/src/lib.rs:
balancer-common/src/csum.rs:
