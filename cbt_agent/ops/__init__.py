"""What a person on the host runs, all readable with the agent down: `status` (the database),
`checkpoints` (one VM's bitmaps beside what the database expects) and `sweep` (what the agent
left behind). Only `sweep --apply` changes anything.

`audit` and `table` are pure; `chains`, `status`, `sweep` and `presence` do the reading."""
