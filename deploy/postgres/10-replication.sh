#!/bin/sh
# Run once by the postgres image's entrypoint when it creates the cluster
# (/docker-entrypoint-initdb.d): let the shardvault worker take base backups
# over the network.  The image's own pg_hba.conf line ("host all all all
# scram-sha-256") does not match replication connections.
set -eu
echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
