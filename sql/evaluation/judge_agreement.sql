-- Each reward model's preference next to the judge's, on the pairs the judge decided for one side
-- (not its ties, nor the pairs it could not judge: preferred is NULL there).
SELECT
    s.variant,
    s.eval_set,
    count(*) AS n,
    count(*) FILTER ((s.r_chosen > s.r_rejected) = (v.preferred = 'chosen')) AS agree,
    count(*) FILTER (v.preferred = 'chosen') AS judge_prefers_chosen
FROM music.rm_scores AS s INNER JOIN music.judge_verdicts AS v USING (eval_set, item_id)
WHERE v.preferred IN ('chosen', 'rejected')
GROUP BY ALL
ORDER BY s.eval_set, s.variant
