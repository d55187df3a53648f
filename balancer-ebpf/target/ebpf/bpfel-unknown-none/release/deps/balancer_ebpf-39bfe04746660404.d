/work/main/balancer-ebpf/target/ebpf/bpfel-unknown-none/release/deps/balancer_ebpf-39bfe04746660404.d: balancer-ebpf/src/main.rs balancer-ebpf/src/forward.rs balancer-ebpf/src/maps.rs balancer-ebpf/src/nat.rs balancer-ebpf/src/packet.rs balancer-ebpf/src/stats.rs

/work/main/balancer-ebpf/target/ebpf/bpfel-unknown-none/release/deps/balancer_ebpf-39bfe04746660404: balancer-ebpf/src/main.rs balancer-ebpf/src/forward.rs balancer-ebpf/src/maps.rs balancer-ebpf/src/nat.rs balancer-ebpf/src/packet.rs balancer-ebpf/src/stats.rs

balancer-ebpf/src/main.rs:
balancer-ebpf/src/forward.rs:
balancer-ebpf/src/maps.rs:
balancer-ebpf/src/nat.rs:
balancer-ebpf/src/packet.rs:
balancer-ebpf/src/stats.rs:
