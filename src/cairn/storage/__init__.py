"""Where bytes live: the content-addressed object store, snapshots, datastore roots."""
