//! `report.html` in a real browser: a small simulation writes its report, headless Chromium loads
//! it (from disk, with the network unused), runs the page's render check and dumps the DOM; every
//! chart must have been laid out with a visible line.
//!
//! Skips, saying so, when no Chromium is installed (`apt-get install -y chromium`); set
//! `STARLING_CHROMIUM` to use another binary. The same check by hand is in `docs/simulation.md`.

use starling_coordinator::sim::report::RoundRecord;
use starling_coordinator::sim::{self, Dataset, NoiseSampler, PrivacyMode, SimConfig};
use std::path::PathBuf;
use std::process::Command;

fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("STARLING_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
        "/usr/bin/google-chrome-stable",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

#[test]
fn report_html_renders_every_chart_in_headless_chromium() -> anyhow::Result<()> {
    let config = SimConfig {
        dataset: Dataset::Synthetic { users: 300, items: 200, seed: 5 },
        clients_per_round: 50,
        rounds: 12,
        eval_every: 4,
        availability: None,
        // Central DP, so the ε chart has a line too.
        privacy: PrivacyMode::Central {
            clip: 0.5,
            noise_multiplier: 1.0,
            epsilon: 50.0,
            delta: 1e-5,
            adaptive_quantile: None,
            sampler: NoiseSampler::Fast,
        },
        ..SimConfig::default()
    };
    let report = sim::run(&config, &mut |_: &RoundRecord, _: u32| {})?;
    let dir = tempfile::tempdir()?;
    report.write(dir.path())?;
    let html_path = dir.path().join("report.html");
    let html = std::fs::read_to_string(&html_path)?;
    assert_eq!(html.matches("<svg").count(), 6);

    let Some(browser) = chromium() else {
        // CI installs Chromium (.ci/run): there, a missing browser is a failure, not a skip.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "no chromium found under CI=true (apt-get install -y chromium, or set STARLING_CHROMIUM)"
        );
        println!("SKIPPED: no chromium found (apt-get install -y chromium, or set STARLING_CHROMIUM)");
        return Ok(());
    };
    let profile = tempfile::tempdir()?;
    let out = Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("file://{}", html_path.display()))
        .output()?;
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        dom.contains("data-rendered=\"6/6\""),
        "not every chart rendered: {}",
        &dom[..dom.len().min(600)]
    );
    // The configuration made it into the page.
    assert!(dom.contains("clients_per_round"));
    Ok(())
}
