//go:build tools

// Package cluster only pins the module graph; the binaries are built by package path.
package cluster
