//! Rounds, checkpoints and evaluations: what a round leaves in the store.

use super::*;

impl Store {
    /// Stores the initial model as version `version` (round 0) if no checkpoint exists yet;
    /// returns whether it was stored.
    pub fn init_model(
        &mut self,
        version: ModelVersion,
        shape: ModelShape,
        model: &[f32],
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let tx = self.conn.transaction()?;
        let any: i64 = tx.query_row("SELECT count(*) FROM checkpoints", [], |r| r.get(0))?;
        if any > 0 {
            return Ok(false);
        }
        insert_checkpoint(&tx, version, RoundId(0), shape, model, None, now_ms)?;
        tx.commit()?;
        Ok(true)
    }

    /// Records that `round` started from `base_version`; durable on return. Call before any
    /// client is sent the round's task.
    pub fn begin_round(
        &mut self,
        round: RoundId,
        base_version: ModelVersion,
        evaluation: bool,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let kind = if evaluation { "evaluate" } else { "train" };
        let inserted = self.conn.execute(
            "INSERT OR IGNORE INTO rounds (round, base_version, state, started_ms, kind) VALUES (?1, ?2, 'started', ?3, ?4)",
            params![to_i64(round.0)?, to_i64(base_version.0)?, now_ms, kind],
        )?;
        if inserted == 0 {
            return Err(StoreError::RoundState {
                round: round.0,
                action: "begun",
                state: self.round_state(round)?,
            });
        }
        Ok(())
    }

    fn round_state(&self, round: RoundId) -> Result<String, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT state FROM rounds WHERE round = ?1", params![to_i64(round.0)?], |r| r.get(0))
            .optional()?
            .unwrap_or_else(|| "missing".into()))
    }

    /// Commits a round atomically: its ledger entry (if DP produced one), the new checkpoint and
    /// the `committed` state, in one fsynced transaction; then prunes checkpoints beyond the
    /// newest `keep`. The model may be released once this returns `Ok`.
    pub fn commit_round(
        &mut self,
        commit: &RoundCommit<'_>,
        now_ms: i64,
        keep: u32,
    ) -> Result<(), StoreError> {
        let RoundCommit { round, version, shape, model, ledger, strategy_state, figures } = *commit;
        let tx = self.conn.transaction()?;
        let r = to_i64(round.0)?;
        let updated = tx.execute(
            "UPDATE rounds SET state = 'committed', finished_ms = ?2, result_version = ?3
             WHERE round = ?1 AND state = 'started'",
            params![r, now_ms, to_i64(version.0)?],
        )?;
        set_figures(&tx, r, &figures)?;
        if updated == 0 {
            drop(tx);
            return Err(StoreError::RoundState {
                round: round.0,
                action: "committed",
                state: self.round_state(round)?,
            });
        }
        if let Some(entry) = ledger {
            insert_ledger(&tx, entry, now_ms)?;
        }
        insert_checkpoint(&tx, version, round, shape, model, strategy_state, now_ms)?;
        tx.execute(
            "DELETE FROM checkpoints WHERE version NOT IN
                 (SELECT version FROM checkpoints ORDER BY version DESC LIMIT ?1)",
            params![i64::from(keep.max(1))],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records a released evaluation round atomically: its ledger entry (under DP), its figures
    /// and its `evaluated` state, in one fsynced transaction. The figures may be released once
    /// this returns `Ok`.
    pub fn record_evaluation(
        &mut self,
        record: &EvaluationRecord,
        ledger: Option<&LedgerEntry>,
        figures: &RoundFigures,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let r = to_i64(record.round)?;
        let updated = tx.execute(
            "UPDATE rounds SET state = 'evaluated', finished_ms = ?2, result_version = ?3
             WHERE round = ?1 AND state = 'started'",
            params![r, record.at, to_i64(record.version)?],
        )?;
        set_figures(&tx, r, figures)?;
        if updated == 0 {
            drop(tx);
            return Err(StoreError::RoundState {
                round: record.round,
                action: "evaluated",
                state: self.round_state(RoundId(record.round))?,
            });
        }
        if let Some(entry) = ledger {
            insert_ledger(&tx, entry, record.at)?;
        }
        tx.execute(
            "INSERT INTO evaluations (round, version, reports, cases, hr_at_10, ndcg_at_10, loss, noise_std, recorded_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                r,
                to_i64(record.version)?,
                to_i64(record.reports)?,
                record.cases,
                record.hr_at_10,
                record.ndcg_at_10,
                record.loss,
                record.noise_std,
                record.at
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The newest `limit` evaluation rounds, oldest first.
    pub fn evaluations(&self, limit: usize) -> Result<Vec<EvaluationRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT round, version, reports, cases, hr_at_10, ndcg_at_10, loss, noise_std, recorded_ms
             FROM (SELECT * FROM evaluations ORDER BY round DESC LIMIT ?1) ORDER BY round",
        )?;
        let rows = stmt.query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            let noise_std: Option<f64> = r.get(7)?;
            Ok(EvaluationRecord {
                round: r.get::<_, i64>(0)? as u64,
                version: r.get::<_, i64>(1)? as u64,
                reports: r.get::<_, i64>(2)? as u64,
                cases: r.get(3)?,
                hr_at_10: r.get(4)?,
                ndcg_at_10: r.get(5)?,
                loss: r.get(6)?,
                noised: noise_std.is_some(),
                noise_std,
                at: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records that a started round failed (model unchanged).
    pub fn fail_round(
        &mut self,
        round: RoundId,
        detail: &str,
        figures: &RoundFigures,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let updated = self.conn.execute(
            "UPDATE rounds SET state = 'failed', finished_ms = ?2, detail = ?3, selected = ?4, reported = ?5,
                 dropped = ?6, unfinished = ?7, rejected = ?8
             WHERE round = ?1 AND state = 'started'",
            params![
                to_i64(round.0)?,
                now_ms,
                detail,
                to_i64(figures.selected)?,
                to_i64(figures.reported)?,
                to_i64(figures.dropped)?,
                to_i64(figures.unfinished)?,
                to_i64(figures.rejected)?
            ],
        )?;
        if updated == 0 {
            return Err(StoreError::RoundState {
                round: round.0,
                action: "failed",
                state: self.round_state(round)?,
            });
        }
        Ok(())
    }

    /// At start-up: marks every `started` round `abandoned`, and returns the newest committed
    /// model (checksum verified) and the next round id.
    pub fn recover(&mut self, now_ms: i64) -> Result<Recovery, StoreError> {
        let tx = self.conn.transaction()?;
        let abandoned: Vec<RoundId> = {
            let mut stmt = tx.prepare("SELECT round FROM rounds WHERE state = 'started' ORDER BY round")?;
            let rows = stmt.query_map([], |r| r.get::<_, i64>(0))?;
            rows.map(|r| r.map(|v| RoundId(v as u64))).collect::<Result<_, _>>()?
        };
        tx.execute(
            "UPDATE rounds SET state = 'abandoned', finished_ms = ?1, detail = 'coordinator restarted'
             WHERE state = 'started'",
            params![now_ms],
        )?;
        let max_round: Option<i64> = tx.query_row("SELECT max(round) FROM rounds", [], |r| r.get(0))?;
        let max_ledger: Option<i64> =
            tx.query_row("SELECT max(round) FROM privacy_ledger", [], |r| r.get(0))?;
        tx.commit()?;
        let last = max_round.unwrap_or(0).max(max_ledger.unwrap_or(0)).max(0) as u64;
        Ok(Recovery { latest: self.latest_checkpoint()?, next_round: RoundId(last + 1), abandoned })
    }

    /// The newest checkpoint.
    pub fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        let version: Option<i64> =
            self.conn.query_row("SELECT max(version) FROM checkpoints", [], |r| r.get(0))?;
        match version {
            None => Ok(None),
            Some(v) => self.checkpoint(ModelVersion(v as u64)),
        }
    }

    /// The checkpoint of `version`, if kept.
    pub fn checkpoint(&self, version: ModelVersion) -> Result<Option<Checkpoint>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT round, rows, row_len, model, crc32, strategy_state, state_crc32 FROM checkpoints WHERE version = ?1",
                params![to_i64(version.0)?],
                |r| {
                    Ok((
                        (r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?),
                        r.get::<_, Vec<u8>>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, Option<Vec<u8>>>(5)?,
                        r.get::<_, Option<i64>>(6)?,
                    ))
                },
            )
            .optional()?;
        let Some(((round, rows, row_len), blob, crc, state, state_crc)) = row else { return Ok(None) };
        let bad = |detail: String| StoreError::BadCheckpoint { version: version.0, detail };
        if i64::from(crc32fast::hash(&blob)) != crc {
            return Err(bad("checksum mismatch".into()));
        }
        match (&state, state_crc) {
            (None, _) => {}
            (Some(s), Some(c)) if i64::from(crc32fast::hash(s)) == c => {}
            (Some(_), _) => return Err(bad("strategy state checksum mismatch".into())),
        }
        let shape = ModelShape::new(
            u32::try_from(rows).map_err(|_| bad(format!("rows {rows}")))?,
            u32::try_from(row_len).map_err(|_| bad(format!("row_len {row_len}")))?,
        )
        .map_err(|e| bad(e.to_string()))?;
        if blob.len() != shape.len() * 4 {
            return Err(bad(format!("{} bytes for {} values", blob.len(), shape.len())));
        }
        let model: Vec<f32> =
            blob.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if model.iter().any(|v| !v.is_finite()) {
            return Err(bad("non-finite value".into()));
        }
        Ok(Some(Checkpoint { version, round: RoundId(round as u64), shape, model, strategy_state: state }))
    }

    /// Versions of the kept checkpoints, oldest first.
    pub fn checkpoint_versions(&self) -> Result<Vec<ModelVersion>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT version FROM checkpoints ORDER BY version")?;
        let rows = stmt.query_map([], |r| r.get::<_, i64>(0))?;
        Ok(rows.map(|r| r.map(|v| ModelVersion(v as u64))).collect::<Result<_, _>>()?)
    }

    /// Every recorded round, oldest first.
    pub fn rounds(&self) -> Result<Vec<RoundRecord>, StoreError> {
        self.recent_rounds(usize::MAX)
    }

    /// The newest `limit` recorded rounds, oldest first.
    pub fn recent_rounds(&self, limit: usize) -> Result<Vec<RoundRecord>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT round, base_version, state, result_version, detail, kind, started_ms, finished_ms,
                    selected, reported, dropped, unfinished, rejected
             FROM (SELECT * FROM rounds ORDER BY round DESC LIMIT ?1) ORDER BY round",
        )?;
        let rows = stmt.query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
            let n = |i: usize| -> rusqlite::Result<Option<u64>> {
                Ok(r.get::<_, Option<i64>>(i)?.map(|v| v as u64))
            };
            let figures = match (n(8)?, n(9)?, n(10)?, n(11)?, n(12)?) {
                (Some(selected), Some(reported), Some(dropped), Some(unfinished), Some(rejected)) => {
                    Some(RoundFigures { selected, reported, dropped, unfinished, rejected })
                }
                _ => None,
            };
            Ok(RoundRecord {
                round: RoundId(r.get::<_, i64>(0)? as u64),
                base_version: ModelVersion(r.get::<_, i64>(1)? as u64),
                state: r.get(2)?,
                result_version: r.get::<_, Option<i64>>(3)?.map(|v| ModelVersion(v as u64)),
                detail: r.get(4)?,
                kind: r.get(5)?,
                started_ms: r.get(6)?,
                finished_ms: r.get(7)?,
                figures,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// What the round schedule had done before a restart: training rounds ever begun, and
    /// training rounds committed since the newest evaluation round (begun) — the counters the
    /// schedule's `max_rounds` and `evaluate_every` continue from.
    pub fn schedule_counters(&self) -> Result<(u64, u64), StoreError> {
        let begun: i64 =
            self.conn.query_row("SELECT count(*) FROM rounds WHERE kind = 'train'", [], |r| r.get(0))?;
        let since: i64 = self.conn.query_row(
            "SELECT count(*) FROM rounds WHERE kind = 'train' AND state = 'committed'
               AND round > coalesce((SELECT max(round) FROM rounds WHERE kind = 'evaluate'), 0)",
            [],
            |r| r.get(0),
        )?;
        Ok((begun as u64, since as u64))
    }

    /// An operator's rollback: stores checkpoint `source` again as `version` (its model and
    /// strategy state, checksums verified), in one transaction, pruning beyond the newest
    /// `keep`. Returns the new checkpoint; the ledger is untouched (what was spent stays spent).
    pub fn install_checkpoint(
        &mut self,
        version: ModelVersion,
        source: ModelVersion,
        now_ms: i64,
        keep: u32,
    ) -> Result<Checkpoint, StoreError> {
        let Some(c) = self.checkpoint(source)? else {
            return Err(StoreError::BadCheckpoint { version: source.0, detail: "not kept".into() });
        };
        let tx = self.conn.transaction()?;
        insert_checkpoint(&tx, version, c.round, c.shape, &c.model, c.strategy_state.as_deref(), now_ms)?;
        tx.execute(
            "DELETE FROM checkpoints WHERE version NOT IN
                 (SELECT version FROM checkpoints ORDER BY version DESC LIMIT ?1)",
            params![i64::from(keep.max(1))],
        )?;
        tx.commit()?;
        Ok(Checkpoint { version, ..c })
    }
}

fn set_figures(tx: &rusqlite::Transaction<'_>, round: i64, f: &RoundFigures) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE rounds SET selected = ?2, reported = ?3, dropped = ?4, unfinished = ?5, rejected = ?6 WHERE round = ?1",
        params![
            round,
            to_i64(f.selected)?,
            to_i64(f.reported)?,
            to_i64(f.dropped)?,
            to_i64(f.unfinished)?,
            to_i64(f.rejected)?
        ],
    )?;
    Ok(())
}
