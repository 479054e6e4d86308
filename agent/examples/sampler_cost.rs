//! What the energy sampler costs: CPU time of this process while the sampler reads the best
//! source under a sysfs root for a while and the main thread sleeps. Prints one JSON object.
//!
//! Usage: sampler_cost SYSFS_ROOT SECONDS

use std::time::{Duration, Instant};

use plaster_agent::sensors::sampler::Sampler;
use plaster_agent::sensors::{discover, DiscoveryOptions};

/// utime + stime of this process, in seconds (`/proc/self/stat` fields 14 and 15).
fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let after_name = &stat[stat.rfind(')').ok_or_else(|| anyhow::anyhow!("bad stat"))? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // USER_HZ is 100 on every Linux the agent targets.
    Ok(ticks / 100.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 3, "usage: sampler_cost SYSFS_ROOT SECONDS");
    let seconds: f64 = args[2].parse()?;
    let mut discovery = discover(&DiscoveryOptions::new(&args[1]));
    let source = discovery
        .take_best()
        .ok_or_else(|| anyhow::anyhow!("no usable source under {}", args[1]))?;
    let sampler = Sampler::start(source);
    let cpu0 = cpu_seconds()?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let cpu = cpu_seconds()? - cpu0;
    let wall = t0.elapsed().as_secs_f64();
    let snap = sampler.snapshot();
    println!(
        "{{\"source\": \"{}\", \"period_ms\": {}, \"reads\": {}, \"cpu_percent_of_one_core\": {:.3}}}",
        sampler.source_name,
        sampler.period.as_secs_f64() * 1e3,
        snap.reads,
        100.0 * cpu / wall
    );
    Ok(())
}
