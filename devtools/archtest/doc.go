// Package archtest holds the tests that keep the repository's shape true:
// docs/architecture.md's rules on who may import whom (checked against go
// list -deps), and the rule that product code takes its time from
// internal/clock. It has no code of its own to import; `go test
// ./devtools/archtest/` runs the checks.
package archtest
