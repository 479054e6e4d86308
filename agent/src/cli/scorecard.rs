//! The human scorecard: one row per PLASTER letter.

use super::table;
use crate::plaster::Report;

/// Renders `report` as the table `bench` prints without `--json`.
pub fn render(report: &Report) -> String {
    let mut table = table(vec!["", "PLASTER", "measured"]);
    for (letter, name, value) in rows(report) {
        table.add_row(vec![letter.to_string(), name.to_string(), value]);
    }
    let version = report
        .model
        .version
        .map(|v| format!(" v{v}"))
        .unwrap_or_default();
    let profile = report
        .profile
        .as_ref()
        .map(render_profile)
        .unwrap_or_default();
    let check = report
        .outputs_vs_cpu
        .as_ref()
        .map(|c| {
            format!(
                "outputs {}: max |difference| {} over {} input batches, {} integer outputs differ\n",
                c.compared,
                sig(c.max_abs_diff),
                c.inputs,
                c.integer_mismatches
            )
        })
        .unwrap_or_default();
    format!(
        "model  {}{version} (sha256 {})\ndevice {} ({}, {} runtime, {} thread{})\n{table}\n{check}{profile}",
        report.model.name,
        &report.model.sha256[..report.model.sha256.len().min(12)],
        report.device.id,
        report.device.arch,
        report.device.runtime,
        report.device.threads,
        if report.device.threads == 1 { "" } else { "s" },
    )
}

fn gflops(rate: Option<f64>) -> String {
    rate.map(|g| format!("{g:.1}"))
        .unwrap_or_else(|| "-".into())
}

fn render_profile(p: &crate::inference::Profile) -> String {
    let mut ops = table(vec!["op", "nodes", "share", "ms/inference", "GFLOP/s"]);
    for op in &p.ops {
        ops.add_row(vec![
            op.op.clone(),
            op.nodes.to_string(),
            format!("{:.1}%", op.share * 100.0),
            sig(op.ms_per_inference),
            gflops(op.gflops_per_s),
        ]);
    }
    let mut nodes = table(vec![
        "node",
        "op",
        "share",
        "ms/inference",
        "GFLOP/s",
        "shape",
    ]);
    for node in &p.nodes {
        nodes.add_row(vec![
            node.name.clone(),
            node.op.clone(),
            format!("{:.1}%", node.share * 100.0),
            sig(node.ms_per_inference),
            gflops(node.gflops_per_s),
            node.info.clone(),
        ]);
    }
    format!(
        "profile: {} runs, {} ms/inference wall, {} ms in ops\n{ops}\nslowest nodes:\n{nodes}\n",
        p.runs,
        sig(p.wall_ms_per_inference),
        sig(p.ops_ms_per_inference)
    )
}

fn rows(r: &Report) -> Vec<(char, &'static str, String)> {
    let p = &r.programmability;
    let mut programmability = format!(
        "{} nodes, {} on the accelerator",
        p.nodes_total, p.nodes_on_accelerator
    );
    if !p.cpu_fallback_ops.is_empty() {
        programmability.push_str(&format!(
            "; CPU fallback: {}",
            p.cpu_fallback_ops.join(", ")
        ));
    }
    if !p.rewrites.is_none() {
        programmability.push_str(&format!("; rewritten: {}", p.rewrites.summary()));
    }
    let l = &r.latency_ms;
    let latency = match (l.p50, l.p90, l.p99, l.max) {
        (Some(p50), Some(p90), Some(p99), Some(max)) => format!(
            "p50 {} · p90 {} · p99 {} · max {} ms ({} queries)",
            sig(p50),
            sig(p90),
            sig(p99),
            sig(max),
            l.count
        ),
        _ => "not measured: no queries ran".to_string(),
    };
    let accuracy = match &r.accuracy {
        None => "not measured: no dataset (--dataset NPZ)".to_string(),
        Some(a) => {
            let delta = a
                .delta_vs_f32
                .map(|d| format!(", {:+.2} points vs f32", d * 100.0))
                .unwrap_or_default();
            format!(
                "top-1 {:.2}% of {} samples ({}{delta})",
                a.value * 100.0,
                a.samples,
                a.precision
            )
        }
    };
    let s = &r.size;
    let size = format!(
        "{} file · {} parameters · {} · peak RSS {}",
        bytes(s.file_bytes),
        count(s.parameters),
        s.flops_per_inference
            .map(|f| format!("{} FLOP/inference", si(f as f64)))
            .unwrap_or_else(|| "FLOPs unknown".into()),
        s.peak_rss_bytes
            .map(bytes)
            .unwrap_or_else(|| "unknown".into()),
    );
    let t = &r.throughput;
    let mut throughput = format!(
        "{:.1} inferences/s ({}, batch {})",
        t.inferences_per_s, t.scenario, t.batch
    );
    if let (Some(qps), Some(bound), Some(met)) = (t.target_qps, t.latency_bound_ms, t.bound_met) {
        throughput.push_str(&format!(
            "; {qps:.1} queries/s offered, p99 bound {bound} ms {}",
            if met { "met" } else { "NOT met" }
        ));
    }
    if let Some(valid) = t.valid {
        throughput.push_str(if valid {
            "; valid MLPerf run"
        } else {
            "; INVALID as an MLPerf run (too short)"
        });
    }
    let e = &r.energy;
    let energy = match e.joules_per_inference {
        Some(j) => format!(
            "{} J/inference ({} marginal) · {} W mean · {} ({} samples)",
            sig(j),
            e.marginal_joules_per_inference
                .map(sig)
                .unwrap_or_else(|| "?".into()),
            e.mean_power_w
                .map(|w| format!("{w:.2}"))
                .unwrap_or_else(|| "?".into()),
            e.source.as_deref().unwrap_or("?"),
            e.samples
        ),
        None => e.status.clone(),
    };
    let g = &r.learning;
    let learning = if g.status == "measured" {
        format!(
            "{} updates ok, {} rejected, {} rollbacks{}",
            g.updates_ok,
            g.updates_rejected,
            g.rollbacks,
            g.push_to_active_s
                .map(|s| format!("; last push to active {s:.2} s"))
                .unwrap_or_default()
        )
    } else {
        g.status.clone()
    };
    vec![
        ('P', "Programmability", programmability),
        ('L', "Latency", latency),
        ('A', "Accuracy", accuracy),
        ('S', "Size of model", size),
        ('T', "Throughput", throughput),
        ('E', "Energy efficiency", energy),
        ('R', "Rate of learning", learning),
    ]
}

/// Four significant digits, without scientific notation for everyday magnitudes.
pub(crate) fn sig(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = (3 - v.abs().log10().floor() as i32).clamp(0, 9) as usize;
    format!("{v:.digits$}")
}

fn si(v: f64) -> String {
    for (scale, unit) in [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")] {
        if v >= scale {
            return format!("{:.2} {unit}", v / scale);
        }
    }
    format!("{v:.0} ")
}

fn bytes(b: u64) -> String {
    let b = b as f64;
    for (scale, unit) in [
        (1024.0 * 1024.0 * 1024.0, "GiB"),
        (1024.0 * 1024.0, "MiB"),
        (1024.0, "KiB"),
    ] {
        if b >= scale {
            return format!("{:.1} {unit}", b / scale);
        }
    }
    format!("{b:.0} B")
}

fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (ix, c) in s.chars().enumerate() {
        if ix > 0 && (s.len() - ix).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(sig(0.021234), "0.02123");
        assert_eq!(sig(15.83), "15.83");
        assert_eq!(sig(1234.5), "1234");
        assert_eq!(count(1235496), "1,235,496");
        assert_eq!(count(12), "12");
        assert_eq!(bytes(4948463), "4.7 MiB");
        assert_eq!(si(1.64e9), "1.64 G");
    }
}
