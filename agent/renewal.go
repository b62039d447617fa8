package agent

import (
	"crypto/x509"
	"fmt"
	"time"
)

// RenewalPolicy says when an operational certificate is renewed.
type RenewalPolicy struct {
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

// DefaultRenewalPolicy: 80% of the lifetime, up to 6 h of jitter, renew at
// once with less than 1 h left.
func DefaultRenewalPolicy() RenewalPolicy {
	return RenewalPolicy{Threshold: 0.8, Jitter: 6 * time.Hour, Floor: time.Hour}
}

// renewAt is the planned renewal time for leaf, given the persisted random
// draw in [0, 1).
func renewAt(leaf *x509.Certificate, p RenewalPolicy, draw float64) time.Time {
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
func needsRenewal(now time.Time, leaf *x509.Certificate, p RenewalPolicy, draw float64) (bool, string) {
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
