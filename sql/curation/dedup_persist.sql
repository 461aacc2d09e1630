-- Replaces the dedup outputs with this run's, in one transaction (a failed run leaves the old ones).
BEGIN TRANSACTION;
DELETE FROM music.deduplicated_pairs;
INSERT INTO music.deduplicated_pairs BY NAME
SELECT origin, source, c.pair_id, group_id, user_turns, chosen, rejected
FROM training_candidates c SEMI JOIN dedup_kept k ON k.pair_id = c.pair_id
ORDER BY priority, c.pair_id;

DELETE FROM music.dedup_removed;
INSERT INTO music.dedup_removed BY NAME
SELECT r.pair_id, c.origin, r.rule, r.duplicate_of, r.similarity, r.detail
FROM dedup_removed r JOIN training_candidates c ON c.pair_id = r.pair_id;

DELETE FROM music.dedup_quarantine;
INSERT INTO music.dedup_quarantine BY NAME
SELECT q.pair_id, (SELECT any_value(c.origin) FROM training_candidates c WHERE c.pair_id = q.pair_id) AS origin,
       q.rule, q.reason
FROM dedup_quarantine q;
COMMIT;
