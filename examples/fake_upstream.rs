//! The built-in fake OpenAI-compatible upstream as a standalone process, for load tests and
//! manual runs: `cargo run --release --example fake_upstream -- 127.0.0.1:9000`.
//! Recording is off (constant memory under load).

fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9000".to_string());
    let (up, thread) = preauth_sidecar::demo::upstream::spawn_on_thread(&addr).expect("bind fake upstream");
    up.set_recording(false);
    println!("fake upstream listening on {}", up.base_url());
    let _ = thread.join();
}
