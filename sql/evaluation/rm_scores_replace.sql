-- One variant's old scores, deleted before its new ones (`new_scores`) go in, in one transaction.
DELETE FROM music.rm_scores
WHERE variant = $variant
