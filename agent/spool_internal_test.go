package agent

import "testing"

// The spool's size limit is the one README.md states.
func TestSpoolLimitAsDocumented(t *testing.T) {
	if got := maxSpoolBody(); got != 262080 {
		t.Fatalf("maxSpoolBody() = %d; README.md says 262,080 bytes", got)
	}
}
