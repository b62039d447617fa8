//go:build !amd64 && !arm64

package telemetry

// On other architectures (32-bit ARM's fstatat64, say) the retirer uses
// x/sys's scheduled call.
const (
	sysFstatat = 0
	rawFstatat = false
)
