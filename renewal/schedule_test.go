package renewal

import (
	"crypto/x509"
	"strings"
	"testing"
	"time"
)

func TestNeedsRenewal(t *testing.T) {
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	leaf := &x509.Certificate{NotBefore: nb, NotAfter: nb.Add(100 * time.Hour)} // 100 h lifetime
	p := Policy{Threshold: 0.8, Jitter: 10 * time.Hour, Floor: time.Hour}
	tests := []struct {
		name string
		now  time.Time
		draw float64
		want bool
		why  string
	}{
		{"ok/fresh", nb.Add(time.Hour), 0, false, "planned for 2026-01-04T08:00:00Z"},
		{"ok/just-before-80pct", nb.Add(80*time.Hour - time.Second), 0, false, "planned"},
		{"ok/at-80pct", nb.Add(80 * time.Hour), 0, true, "80% of the lifetime"},
		{"ok/jitter-moves-earlier", nb.Add(75 * time.Hour), 0.5, true, "planned for 2026-01-04T03:00:00Z"},
		{"ok/jitter-not-yet", nb.Add(69 * time.Hour), 1, false, "planned for 2026-01-03T22:00:00Z"},
		{"ok/floor-beats-schedule", nb.Add(99*time.Hour + 30*time.Minute), 0, true, "emergency floor"},
		{"ok/expired", nb.Add(101 * time.Hour), 0, true, "expired 1h0m0s ago"},
		{"ok/clock-before-notbefore", nb.Add(-time.Hour), 0, false, "planned"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, why := needsRenewal(tc.now, leaf, p, tc.draw)
			if got != tc.want || !strings.Contains(why, tc.why) {
				t.Fatalf("needsRenewal = %v, %q; want %v, %q", got, why, tc.want, tc.why)
			}
		})
	}
	// Jitter never pulls renewal before half the lifetime.
	short := &x509.Certificate{NotBefore: nb, NotAfter: nb.Add(10 * time.Hour)}
	if at := renewAt(short, Policy{Threshold: 0.8, Jitter: 24 * time.Hour}, 0.99); at.Before(nb.Add(5 * time.Hour)) {
		t.Fatalf("renewAt %s is before half the lifetime", at)
	}
}

// The jitter draw is stable for one certificate on one device (restarts do
// not re-roll it) and differs across devices and certificates.
func TestRenewalDraw(t *testing.T) {
	seedA, seedB := []byte("device-a-seed-0123456789abcdef!!"), []byte("device-b-seed-0123456789abcdef!!")
	if draw(seedA, "1f") != draw(seedA, "1f") {
		t.Fatal("fail/draw changes between calls for the same certificate")
	}
	if draw(seedA, "1f") == draw(seedB, "1f") || draw(seedA, "1f") == draw(seedA, "20") {
		t.Fatal("fail/draw does not depend on the device and the certificate")
	}
	// 1000 devices: the draws fill [0,1) roughly evenly (each tenth has 5–15%).
	var buckets [10]int
	for i := range 1000 {
		d := draw([]byte{byte(i), byte(i >> 8), 7}, "abc")
		if d < 0 || d >= 1 {
			t.Fatalf("draw %v outside [0,1)", d)
		}
		buckets[int(d*10)]++
	}
	for i, n := range buckets {
		if n < 50 || n > 150 {
			t.Errorf("fail/bucket %d has %d of 1000 draws", i, n)
		}
	}
}
