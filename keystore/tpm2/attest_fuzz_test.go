package tpm2

import (
	"errors"
	"testing"
)

// A challenge comes from the network: whatever its bytes, parsing must not
// panic, and anything it rejects is ErrChallenge.
func FuzzParseChallenge(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0})
	f.Add([]byte{0, 2, 0xff, 0xff, 0, 2, 1, 2, 0, 1, 9, 0, 1, 9, 0, 10, 0, 8, 0, 11, 0, 0, 0, 0x40, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		if _, err := parseChallenge(b); err != nil && !errors.Is(err, ErrChallenge) {
			t.Fatalf("error %v is not ErrChallenge", err)
		}
	})
}
