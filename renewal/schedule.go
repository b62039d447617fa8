package renewal

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/gwagent/gwagent/internal/atomicfile"
)

// Policy says when an operational certificate is renewed.
type Policy struct {
	// Threshold is the share of the lifetime that has elapsed when renewal
	// starts (Microsoft's guidance: 0.8).
	Threshold float64
	// Jitter spreads a fleet: the renew-at point is moved earlier by up to
	// Jitter (never before half the lifetime), by a random draw made once per
	// certificate and persisted, so restarts do not re-roll it.
	Jitter time.Duration
	// Floor is the emergency margin: with less than Floor left, renew now
	// whatever the schedule says.
	Floor time.Duration
}

// DefaultPolicy: 80% of the lifetime, up to 6 h of jitter, renew at once
// with less than 1 h left.
func DefaultPolicy() Policy {
	return Policy{Threshold: 0.8, Jitter: 6 * time.Hour, Floor: time.Hour}
}

// renewAt is the planned renewal time for leaf, given the persisted random
// draw in [0, 1).
func renewAt(leaf *x509.Certificate, p Policy, draw float64) time.Time {
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	at := leaf.NotBefore.Add(time.Duration(float64(life) * p.Threshold))
	jitter := time.Duration(draw * float64(p.Jitter))
	if half := leaf.NotBefore.Add(life / 2); at.Add(-jitter).Before(half) {
		jitter = at.Sub(half)
		if jitter < 0 {
			jitter = 0
		}
	}
	return at.Add(-jitter)
}

// needsRenewal decides, as a pure function of its inputs, whether to renew
// now, and says why (for the log).
func needsRenewal(now time.Time, leaf *x509.Certificate, p Policy, draw float64) (bool, string) {
	left := leaf.NotAfter.Sub(now)
	switch {
	case left <= 0:
		return true, fmt.Sprintf("certificate expired %s ago", (-left).Round(time.Second))
	case left < p.Floor:
		return true, fmt.Sprintf("only %s left, below the emergency floor of %s", left.Round(time.Second), p.Floor)
	}
	at := renewAt(leaf, p, draw)
	if !now.Before(at) {
		elapsed := float64(now.Sub(leaf.NotBefore)) / float64(leaf.NotAfter.Sub(leaf.NotBefore))
		return true, fmt.Sprintf("%.0f%% of the lifetime has elapsed; renewal was planned for %s", elapsed*100, at.UTC().Format(time.RFC3339))
	}
	return false, "planned for " + at.UTC().Format(time.RFC3339)
}

// seedFile holds the device's renewal seed in the state directory.
const seedFile = "renewal-seed"

// loadSeed returns this device's persisted random seed, making it on first
// use: with a certificate's serial it gives the certificate's jitter draw,
// the same after every restart, different on every device. A seed that
// cannot be written is still used (the error says the draw will be made
// again after a restart).
func loadSeed(stateDir string) ([]byte, error) {
	path := filepath.Join(stateDir, seedFile)
	if b, err := os.ReadFile(path); err == nil && len(b) == 32 {
		return b, nil
	}
	seed := make([]byte, 32)
	rand.Read(seed)
	if err := atomicfile.Write(path, seed, 0o600); err != nil {
		return seed, fmt.Errorf("renewal seed: %w", err)
	}
	return seed, nil
}

// draw is the jitter draw in [0, 1) for the certificate with serial.
func draw(seed []byte, serial string) float64 {
	h := sha256.Sum256(append(append([]byte{}, seed...), serial...))
	return float64(binary.BigEndian.Uint64(h[:8])>>11) / (1 << 53)
}
