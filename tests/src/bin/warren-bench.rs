//! Benchmark placeholder; the real one lands with the benchmark work.

fn main() {}
