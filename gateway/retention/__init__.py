"""Retention (issue 6): raw payloads, canonical bundles and the audit trail each expire after
the days the configuration gives them (`RetentionConfig`), while the message index stays.

On PostgreSQL the three tables are partitioned by month (`partitions`) and expiry drops whole
months; on SQLite it deletes in short batches and then gives the pages back to the file
(incremental vacuum). `run.run_retention` does one run; the service schedules it daily.
"""
