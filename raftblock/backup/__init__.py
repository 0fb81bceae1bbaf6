"""Backups of snapshots to an object store or a directory (docs/snapshots.md section 5, docs/format/backup.md):
`chunk` (the chunk objects), `manifest`, `store` (S3 through boto3, or a directory), `transfer` (export,
restore, verify, collect)."""
