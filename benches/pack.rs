//! Packing benchmark: nixery's layer writer (tar → sha256 → compressor →
//! sha256 → sink) against the command-line references on the same files,
//! in the same run.
//!
//! ```text
//! cargo bench --bench pack -- [--mb 300] [DIR ...]
//! ```
//!
//! The content is the first regular files, by name, of the directories
//! (default `/usr/bin` and `/usr/lib/x86_64-linux-gnu`: this machine's own
//! binaries and libraries) up to `--mb` megabytes. References: `tar | pigz -p
//! 2 -6`, `tar | gzip -6` (single-threaded, the original's pipeline), `tar |
//! zstd -T2 -3` and `tar | sha256sum`. It prints MB/s (of uncompressed
//! input) and output sizes; the last line is machine-readable. Under
//! `cargo test` (no `--bench` argument) it runs on 5 MB, to keep working.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use nixery::archive::{self, Compression};
use nixery::digest::DigestWriter;

/// A writer that only counts.
struct Count(u64);

impl Write for Count {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Run {
    name: String,
    seconds: f64,
    output: u64,
}

fn main() -> anyhow::Result<()> {
    let (limit_mb, dirs) = parse_args()?;
    let files = pick_files(&dirs, limit_mb * 1_000_000)?;
    let input: u64 = files.iter().map(|f| f.metadata().map_or(0, |m| m.len())).sum();
    // Warm the page cache so every method reads from memory.
    run_shell("tar -cf - -C / -T \"$LIST\" > /dev/null", &files)?;

    let mut runs = Vec::new();
    let paths: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    for (name, compression) in [
        ("nixery gzip -6 (libdeflate, 1 MiB members)", Compression::Gzip(6)),
        ("nixery zstd -3", Compression::Zstd(3)),
    ] {
        let started = Instant::now();
        let (count, digests) = archive::write_store_layer(&paths, Count(0), compression)?;
        runs.push(Run {
            name: name.to_owned(),
            seconds: started.elapsed().as_secs_f64(),
            output: count.0,
        });
        assert_eq!(count.0, digests.size);
    }
    // What hashing costs on its own: the files through nixery's sha256 writer.
    let started = Instant::now();
    let mut hashed = DigestWriter::new(Count(0));
    for file in &files {
        io::copy(&mut std::fs::File::open(file)?, &mut hashed)?;
    }
    runs.push(Run {
        name: "nixery sha256 of the files".to_owned(),
        seconds: started.elapsed().as_secs_f64(),
        output: 0,
    });
    for (name, filter) in [
        ("tar + pigz -p 2 -6", "pigz -p 2 -6"),
        ("tar + gzip -6", "gzip -6"),
        ("tar + zstd -T2 -3", "zstd -q -T2 -3"),
        ("tar + sha256sum", "sha256sum"),
    ] {
        let started = Instant::now();
        let output = run_shell(&format!("tar -cf - -C / -T \"$LIST\" | {filter} | wc -c"), &files)?;
        runs.push(Run {
            name: name.to_owned(),
            seconds: started.elapsed().as_secs_f64(),
            output: output.trim().parse()?,
        });
    }
    report(input, files.len(), &runs);
    Ok(())
}

fn report(input: u64, files: usize, runs: &[Run]) {
    println!(
        "## Packing {:.0} MB in {files} files ({} cores)",
        input as f64 / 1e6,
        cores()
    );
    println!();
    println!("| method | seconds | MB/s | output MB | output / input |");
    println!("|---|---:|---:|---:|---:|");
    let speed = |r: &Run| input as f64 / 1e6 / r.seconds;
    for r in runs {
        println!(
            "| {} | {:.2} | {:.1} | {:.1} | {:.4} |",
            r.name,
            r.seconds,
            speed(r),
            r.output as f64 / 1e6,
            r.output as f64 / input as f64
        );
    }
    let [gzip, zstd, hash, pigz, gzip_cli, zstd_cli, _] = runs else {
        unreachable!("seven runs")
    };
    // A gzip layer hashes its input and its output once each.
    let hash_share = (input + gzip.output) as f64 / 1e6 / speed(hash) / gzip.seconds;
    println!();
    println!(
        "gzip_vs_pigz={:.2} gzip_size_vs_pigz={:.4} gzip_vs_gzipcli={:.2} zstd_vs_zstdcli={:.2} zstd_size_vs_zstdcli={:.4} gzip_hashing_share={:.3}",
        speed(gzip) / speed(pigz),
        gzip.output as f64 / pigz.output as f64,
        speed(gzip) / speed(gzip_cli),
        speed(zstd) / speed(zstd_cli),
        zstd.output as f64 / zstd_cli.output as f64,
        hash_share
    );
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Regular files directly in `dirs`, by name, until `limit` bytes.
fn pick_files(dirs: &[PathBuf], limit: u64) -> anyhow::Result<Vec<PathBuf>> {
    let mut all = Vec::new();
    for dir in dirs {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() && entry.path().to_str().is_some_and(|p| !p.contains('\n')) {
                all.push(entry.path());
            }
        }
    }
    all.sort();
    let mut total = 0;
    Ok(all
        .into_iter()
        .take_while(|f| {
            let fits = total < limit;
            total += f.metadata().map_or(0, |m| m.len());
            fits
        })
        .collect())
}

/// Runs `script` with `$LIST` naming a file that lists `files` relative to `/`.
fn run_shell(script: &str, files: &[PathBuf]) -> anyhow::Result<String> {
    let mut list = tempfile::NamedTempFile::new()?;
    for f in files {
        writeln!(list, "{}", f.strip_prefix("/").unwrap_or(f).display())?;
    }
    let output = Command::new("bash")
        .args(["-o", "pipefail", "-c", script])
        .env("LIST", list.path())
        .stderr(Stdio::inherit())
        .output()?;
    anyhow::ensure!(output.status.success(), "{script} failed");
    Ok(String::from_utf8(output.stdout)?)
}

fn parse_args() -> anyhow::Result<(u64, Vec<PathBuf>)> {
    let given: Vec<String> = std::env::args().skip(1).collect();
    let mut limit = if given.iter().any(|a| a == "--bench") { 300 } else { 5 };
    let mut dirs = Vec::new();
    let mut args = given.into_iter().filter(|a| a != "--bench");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--mb" => {
                limit = args
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("--mb needs a number"))?
                    .parse()?
            }
            dir => dirs.push(Path::new(dir).to_owned()),
        }
    }
    if dirs.is_empty() {
        dirs = vec!["/usr/bin".into(), "/usr/lib/x86_64-linux-gnu".into()];
    }
    Ok((limit, dirs))
}
