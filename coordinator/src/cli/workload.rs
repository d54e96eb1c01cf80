//! `starling workload …` and `starling baseline`: the reference evaluation set and the centralized
//! baseline.

use clap::{Args, Subcommand};
use starling_models::burn_mf::{CentralTraining, train_central};
use starling_models::data::synthetic::{Population, SyntheticConfig};
use starling_models::data::{LeaveOneOut, movielens};
use starling_models::eval::{EvalSet, full_ranking_hr_at_10};
use std::path::PathBuf;
use std::time::Instant;

/// `starling workload` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum WorkloadCommand {
    /// Write the reference evaluation set (leave-one-out test items and 99 sampled negatives per
    /// user) in the export format of `shared/docs/reference-workload.md`.
    ExportEval {
        /// A MovieLens `u.data`-format file.
        #[arg(long)]
        data: PathBuf,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs `starling workload …`.
pub fn run_workload(cmd: &WorkloadCommand) -> anyhow::Result<()> {
    match cmd {
        WorkloadCommand::ExportEval { data, out } => {
            let r = movielens::load(data)?;
            let split = LeaveOneOut::split(&r.interactions, r.n_users, r.n_items);
            let set = EvalSet::build(&split)?;
            std::fs::write(out, set.export())
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
            println!("wrote {} users' evaluation cases to {}", set.cases.len(), out.display());
            Ok(())
        }
    }
}

/// Options of `starling baseline`.
#[derive(Args, Debug, Clone)]
pub struct BaselineArgs {
    /// A MovieLens `u.data`-format file; without it, the built-in synthetic population.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Synthetic population: users.
    #[arg(long, default_value_t = 5000)]
    pub users: u64,
    /// Synthetic population: items.
    #[arg(long, default_value_t = 2000)]
    pub items: u32,
    /// Embedding dimension.
    #[arg(long, default_value_t = 32)]
    pub dim: usize,
    /// Epochs.
    #[arg(long, default_value_t = CentralTraining::default().epochs)]
    pub epochs: usize,
    /// Mini-batch size.
    #[arg(long, default_value_t = CentralTraining::default().batch_size)]
    pub batch_size: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = CentralTraining::default().lr)]
    pub lr: f64,
    /// L2 regularisation per example.
    #[arg(long, default_value_t = CentralTraining::default().reg)]
    pub reg: f32,
    /// Seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Learn item biases too.
    #[arg(long)]
    pub item_bias: bool,
}

/// Runs `starling baseline`: centralized MF, HR@10/NDCG@10 per epoch, then one JSON line.
pub fn run_baseline(args: &BaselineArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let (interactions, n_users, n_items, synthetic) = match &args.data {
        Some(path) => {
            let r = movielens::load(path)?;
            (r.interactions, r.n_users, r.n_items, false)
        }
        None => {
            let max = (args.items / 4).clamp(2, 400);
            let cfg = SyntheticConfig {
                users: args.users,
                items: args.items,
                max_interactions: max,
                min_interactions: 5.min(max),
                ..SyntheticConfig::default()
            };
            let pop = Population::new(cfg)?;
            (pop.interactions(args.users), args.users as u32, args.items, true)
        }
    };
    let split = LeaveOneOut::split(&interactions, n_users, n_items);
    let eval = EvalSet::build(&split)?;
    let popularity = {
        let counts = split.item_counts();
        eval.evaluate(|_, items, out| out.extend(items.iter().map(|&i| counts[i as usize] as f32)))
    };
    println!(
        "{} users, {} items, {} training pairs; popularity HR@10 {:.4} NDCG@10 {:.4}",
        n_users,
        n_items,
        split.train_pairs(),
        popularity.hr_at_10,
        popularity.ndcg_at_10
    );
    let cfg = CentralTraining {
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        reg: args.reg,
        seed: args.seed,
        item_bias: args.item_bias,
    };
    let mut best = (0usize, 0.0f64, 0.0f64);
    let model = train_central(&split, &eval, args.dim, &cfg, |r| {
        if r.metrics.hr_at_10 > best.1 {
            best = (r.epoch, r.metrics.hr_at_10, r.metrics.ndcg_at_10);
        }
        println!(
            "epoch {:>3}  loss {:.4}  HR@10 {:.4}  NDCG@10 {:.4}  ({:.1} s)",
            r.epoch,
            r.loss,
            r.metrics.hr_at_10,
            r.metrics.ndcg_at_10,
            started.elapsed().as_secs_f64()
        );
    });
    let last = starling_models::burn_mf::evaluate(&model, &eval);
    let full = synthetic.then(|| {
        let (users, global) = starling_models::burn_mf::tables(&model);
        let (layout, d) = (model.layout(), args.dim);
        full_ranking_hr_at_10(&split, |u, out| {
            starling_models::mf::score_all(layout, &global, &users[u as usize * d..(u as usize + 1) * d], out)
        })
    });
    let json = serde_json::json!({
        "model": "mf-bpr",
        "dim": args.dim,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "reg": args.reg,
        "seed": args.seed,
        "item_bias": args.item_bias,
        "hr_at_10": last.hr_at_10,
        "ndcg_at_10": last.ndcg_at_10,
        "full_ranking_hr_at_10": full,
        "best_epoch": best.0,
        "best_hr_at_10": best.1,
        "best_ndcg_at_10": best.2,
        "popularity_hr_at_10": popularity.hr_at_10,
        "seconds": started.elapsed().as_secs_f64(),
    });
    println!("{json}");
    Ok(())
}
