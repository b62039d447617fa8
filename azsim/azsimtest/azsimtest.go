// Package azsimtest starts the emulator in-process for tests, on free loopback
// ports in a temporary directory, and talks to its admin API. Only tests (and
// test support) import it; the product never links the emulator.
package azsimtest

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim"
)

// Azsim is a running in-process azsim on free loopback ports.
type Azsim struct {
	t      testing.TB
	Server *azsim.Server
	Info   azsim.Info
	Dir    string
	// TelemetryLog is the file the hub appends received messages to.
	TelemetryLog string

	cfg azsim.Config
}

// Start starts azsim in a temporary state directory; cfg may set
// CertLifetime and the like (addresses and StateDir are filled in). It is
// stopped when the test ends.
func Start(t testing.TB, cfg azsim.Config) *Azsim {
	t.Helper()
	dir := t.TempDir()
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.DPSAddr, cfg.HubAddr, cfg.AdminAddr = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	cfg.DPSHTTPSAddr = "127.0.0.1:0"
	cfg.DPSWSAddr, cfg.HubWSAddr = "127.0.0.1:0", "127.0.0.1:0"
	if cfg.RetryAfter == 0 {
		cfg.RetryAfter = 1
	}
	if cfg.IssueDelay == 0 {
		cfg.IssueDelay = 100 * time.Millisecond
	}
	a := &Azsim{t: t, Dir: dir, TelemetryLog: filepath.Join(dir, "telemetry.jsonl")}
	cfg.TelemetryLog = a.TelemetryLog
	a.cfg = cfg
	a.start()
	return a
}

func (a *Azsim) start() {
	a.t.Helper()
	s, err := azsim.New(a.cfg)
	if err != nil {
		a.t.Fatal(err)
	}
	for _, w := range s.Warnings() {
		a.t.Log("azsim: warning:", w)
	}
	if err := s.Start(); err != nil {
		s.Close()
		a.t.Fatal(err)
	}
	a.t.Cleanup(func() { s.Close() })
	a.Server, a.Info = s, s.Info()
}

// Restart stops azsim as `azsim serve` stops on SIGTERM (every connection
// dropped) and starts it again on the same ports and state directory, as
// an operator restarting it would.
func (a *Azsim) Restart() {
	a.t.Helper()
	if err := a.Server.Close(); err != nil {
		a.t.Fatal(err)
	}
	l := a.Info.Listen
	a.cfg.DPSAddr, a.cfg.DPSHTTPSAddr, a.cfg.HubAddr, a.cfg.AdminAddr = l.DPS, l.DPSHTTPS, l.Hub, l.Admin
	off := func(addr string) string {
		if addr == "" {
			return "off"
		}
		return addr
	}
	a.cfg.DPSWSAddr, a.cfg.HubWSAddr = off(l.DPSWebSocket), off(l.HubWebSocket)
	if l.Hub2 != "" {
		a.cfg.Hub2Addr = l.Hub2
	}
	a.start()
}

// Admin calls the admin API and decodes a JSON answer into out (if not
// nil); it returns the HTTP status.
func (a *Azsim) Admin(method, path string, body any, out any) int {
	a.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case []byte:
		rd = bytes.NewReader(b)
	case string:
		rd = strings.NewReader(b)
	default:
		j, _ := json.Marshal(b)
		rd = bytes.NewReader(j)
	}
	req, _ := http.NewRequest(method, a.Info.AdminURL+path, rd)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		a.t.Fatalf("admin %s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if out != nil && len(raw) > 0 {
		if err := json.Unmarshal(raw, out); err != nil {
			a.t.Fatalf("admin %s %s: %v: %s", method, path, err, raw)
		}
	}
	return resp.StatusCode
}

// Telemetry returns the messages the hub received so far.
func (a *Azsim) Telemetry() []map[string]any {
	a.t.Helper()
	var out []map[string]any
	for _, line := range a.TelemetryLines() {
		var m map[string]any
		if err := json.Unmarshal(line, &m); err != nil {
			a.t.Fatalf("telemetry log line %q: %v", line, err)
		}
		out = append(out, m)
	}
	return out
}

// TelemetryLines returns the hub's telemetry log records so far, a line
// each. The hub may be appending one as it is read (a packed message is
// several KiB, more than a reader is sure to see written at once): only
// lines with their newline are complete, and only those are returned.
func (a *Azsim) TelemetryLines() [][]byte {
	a.t.Helper()
	b, err := os.ReadFile(a.TelemetryLog)
	if err != nil && !os.IsNotExist(err) {
		a.t.Fatal(err)
	}
	var out [][]byte
	for {
		line, rest, ok := bytes.Cut(b, []byte("\n"))
		if !ok {
			return out
		}
		if len(bytes.TrimSpace(line)) > 0 {
			out = append(out, line)
		}
		b = rest
	}
}
