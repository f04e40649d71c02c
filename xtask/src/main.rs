#![allow(clippy::print_stdout)] // a command-line tool: stdout is its interface
//! Project automation. `cargo xtask test` is what CI runs; `cargo xtask
//! bench` and `cargo xtask fuzz` are for people.
//!
//! xtask creates everything it needs itself (Python venvs under
//! `target/xtask/`), so a fresh clone needs no other setup step.

mod bench;
mod disk;
mod floor;
mod proxy;
mod python;
mod readme;
mod rust_client;
mod soak;
mod suite;
mod test;
mod wheel;

use anyhow::{bail, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("test") => test::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("fuzz") => test::fuzz(&args[1..]),
        Some("soak") => soak::main(&args[1..]),
        Some("wheel") => {
            let env = test::Env::prepare()?;
            wheel::build(&env).map(drop)
        }
        Some("readme") => {
            // The README step of `test` alone (the wheel venv of an earlier
            // `test` run serves the notebook block).
            let env = test::Env::prepare()?;
            let wheel = Some(wheel::full_venv_python()).filter(|p| p.exists());
            let (_, failed, _) = readme::run(&env, wheel.as_deref())?;
            if failed > 0 {
                bail!("{failed} README blocks failed");
            }
            Ok(())
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <command>\n\n\
                 commands:\n  \
                 test   fmt, clippy, every Rust test, the Python executor tests and the real\n         \
                        ksrpc 0.8.1 client suite against our server\n  \
                 bench  our server vs the original Python ksrpc 0.8.1, same workloads, one run
         \
                        (--quick for a smoke run); table on stdout, JSON in target/bench/
  \
                 fuzz   run each cargo-fuzz target for a bounded time (not in CI)\n  \
                 soak   [MINUTES] a bounded mixed load watching for wrong answers, starvation and growth\n  \
                 wheel  build the ksrpc-rs wheel (maturin, abi3, manylinux2014) into target/wheels/\n  \
                 readme run the README's blocks (the step of `test`)"
            );
            bail!("unknown or missing command")
        }
    }
}
