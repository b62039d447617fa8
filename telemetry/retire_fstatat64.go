//go:build amd64 || arm64

package telemetry

import "golang.org/x/sys/unix"

// sysFstatat is the fstatat system call whose struct is unix.Stat_t;
// rawFstatat says the retirer may make it raw.
const (
	sysFstatat = unix.SYS_NEWFSTATAT
	rawFstatat = true
)
