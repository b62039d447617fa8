// Package duration is the configuration's duration type: a time.Duration
// written as "90s", "5m", "1h30m" in TOML (or any text format). A leaf: it
// imports nothing of gwagent's and keeps no state.
package duration

import (
	"fmt"
	"time"
)

// Duration is a time.Duration that reads and writes itself as text.
type Duration struct{ time.Duration }

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("%q is not a duration (examples: 90s, 5m, 1h30m)", b)
	}
	d.Duration = v
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }
