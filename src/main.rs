//! The `dinostream` binary: parse arguments, start logging, run the command, map the outcome to an
//! exit code (0 ok, 1 failure, 78 configuration error). Everything else lives in the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = dinostream::cli::parse();
    dinostream::cli::init_logging(&args);
    match dinostream::cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("dinostream: {err:#}");
            ExitCode::from(dinostream::cli::exit_code(&err))
        }
    }
}
