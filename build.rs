//! `WORKER_TESTS_WITHOUT_BROKER=1` marks the tests that need RabbitMQ as ignored, so that a run
//! without a broker says so in its summary ("N ignored") instead of counting them as passed.

fn main() {
    println!("cargo:rerun-if-env-changed=WORKER_TESTS_WITHOUT_BROKER");
    println!("cargo:rustc-check-cfg=cfg(without_broker)");
    if std::env::var("WORKER_TESTS_WITHOUT_BROKER").is_ok_and(|v| v == "1") {
        println!("cargo:rustc-cfg=without_broker");
    }
}
