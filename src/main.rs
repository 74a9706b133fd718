fn main() -> std::process::ExitCode {
    worker::cli::main()
}
