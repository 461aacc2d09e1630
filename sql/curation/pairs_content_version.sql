-- A fingerprint of the deduplicated pairs' content: ids and the full text of both sides, so that
-- an edited row changes the data version (and what trains on it) even when the ids stay the same.
SELECT
    md5(coalesce(string_agg(
        pair_id || ':' || md5(cast(chosen AS VARCHAR) || cast(rejected AS VARCHAR)), ','
        ORDER BY pair_id
    ), ''))
FROM music.deduplicated_pairs
