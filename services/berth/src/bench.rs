//! `berth bench ...`: the benchmarks live in their own binary, `berth-bench`, which links the
//! analyzer for in-process statistics; this client hands it the arguments unchanged and
//! becomes it (same output, same exit code).

use anyhow::{Context, Result};
use std::{ffi::OsString, os::unix::process::CommandExt, process::Command};

pub fn run(args: &[OsString]) -> Result<()> {
    let bin = berth_harness::sibling_binary("berth-bench")?;
    // Only returns if the exec failed.
    let err = Command::new(&bin).args(args).exec();
    Err(err).with_context(|| format!("running {}", bin.display()))
}
