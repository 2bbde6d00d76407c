module multisniff.local/workload

go 1.26.0
