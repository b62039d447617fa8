package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/dps"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/keystore/tpm2"
)

// A manufacturer's enrollment: the EK file gwagent onboard tpm writes goes
// into azsim enroll tpm, and azsim then knows the device.
func TestEnrollTPM(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	sw := testenv.StartSWTPM(t)
	ks, err := tpm2.Open(context.Background(), keystore.MustParse("tpm2:socket="+sw.Sock+";blob=/unused"))
	if err != nil {
		t.Fatal(err)
	}
	e, err := ks.(*tpm2.Store).Endorsement(context.Background())
	ks.Close()
	if err != nil {
		t.Fatal(err)
	}
	ekFile := filepath.Join(t.TempDir(), "ek.b64")
	os.WriteFile(ekFile, []byte(base64.StdEncoding.EncodeToString(e.Public)+"\n"), 0o644)

	var out, errb bytes.Buffer
	err = run(context.Background(), []string{"enroll", "tpm", "--admin", az.Info.AdminURL, "--registration-id", "gw-tpm-cli", "--ek", ekFile}, nil, &out, &errb)
	if err != nil {
		t.Fatalf("enroll: %v\n%s", err, errb.String())
	}
	var list []dps.TPMEnrollment
	az.Admin("GET", "/dps/tpm-enrollments", nil, &list)
	if len(list) != 1 || list[0].RegistrationID != "gw-tpm-cli" || !list[0].Enabled ||
		list[0].EndorsementKey != base64.StdEncoding.EncodeToString(e.Public) {
		t.Fatalf("enrollments: %+v", list)
	}

	t.Run("fail/not an EK", func(t *testing.T) {
		bad := filepath.Join(t.TempDir(), "bad.b64")
		os.WriteFile(bad, []byte(base64.StdEncoding.EncodeToString([]byte("not a TPM2B_PUBLIC"))), 0o644)
		err := run(context.Background(), []string{"enroll", "tpm", "--admin", az.Info.AdminURL, "--registration-id", "x", "--ek", bad}, nil, &out, &errb)
		if err == nil || !strings.Contains(err.Error()+out.String(), "endorsement key") {
			t.Fatalf("a bad EK was enrolled: %v %s", err, out.String())
		}
	})
}

// azsim serve with ephemeral ports reports the ports it really bound, in the
// info file and on stdout, and a listener on another loopback address is
// dialled by that address rather than by localhost.
func TestServeReportsBoundAddresses(t *testing.T) {
	dir := t.TempDir()
	infoFile := filepath.Join(dir, "info.json")
	ctx, cancel := context.WithCancel(context.Background())
	var out, errb testenv.Buffer
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"serve", "--state", filepath.Join(dir, "state"), "--info-file", infoFile,
			"--dps-addr", "127.0.0.1:0", "--dps-https-addr", "127.0.0.1:0", "--hub-addr", "127.0.0.2:0", "--server-names", "127.0.0.2",
			"--admin-addr", "127.0.0.1:0", "--dps-ws-addr", "127.0.0.1:0", "--hub-ws-addr", "127.0.0.2:0"}, nil, &out, &errb)
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v\n%s", err, errb.String())
		}
	})
	var inf azsim.Info
	testenv.Eventually(t, 20*time.Second, "the info file", func() bool {
		b, err := os.ReadFile(infoFile)
		return err == nil && json.Unmarshal(b, &inf) == nil && strings.Contains(out.String(), "trust bundle")
	})
	l := inf.Listen
	for name, a := range map[string]string{"dps": l.DPS, "dpsHttps": l.DPSHTTPS, "dpsWebSocket": l.DPSWebSocket,
		"hub": l.Hub, "hubWebSocket": l.HubWebSocket, "admin": l.Admin} {
		host, port, err := net.SplitHostPort(a)
		if err != nil || port == "0" || port == "" {
			t.Errorf("%s: %q is not a bound address", name, a)
			continue
		}
		if want := "127.0.0.1"; strings.HasPrefix(name, "hub") {
			if host != "127.0.0.2" {
				t.Errorf("%s bound on %q, want 127.0.0.2", name, host)
			}
		} else if host != want {
			t.Errorf("%s bound on %q, want %s", name, host, want)
		}
		c, err := net.DialTimeout("tcp", a, 5*time.Second)
		if err != nil {
			t.Errorf("%s: nothing listens on %s: %v", name, a, err)
			continue
		}
		c.Close()
		if !strings.Contains(out.String(), a) {
			t.Errorf("stdout does not show %s's address %s:\n%s", name, a, out.String())
		}
	}
	if _, port, _ := net.SplitHostPort(l.Hub); inf.HubHostName != "127.0.0.2:"+port {
		t.Errorf("hubHostName %q, want 127.0.0.2:%s (the hub is not on localhost's address)", inf.HubHostName, port)
	}
	if _, port, _ := net.SplitHostPort(l.DPS); inf.DPSAddr != "localhost:"+port {
		t.Errorf("dpsAddr %q, want localhost:%s", inf.DPSAddr, port)
	}
}

// azsim quota shows the tier's limits and the day's use, and sets both the
// use and the quota clock.
func TestQuotaCommand(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{HubTier: "F1"})
	quota := func(args ...string) map[string]any {
		t.Helper()
		var out, errb bytes.Buffer
		if err := run(context.Background(), append([]string{"quota", "--admin", az.Info.AdminURL}, args...), nil, &out, &errb); err != nil {
			t.Fatalf("azsim quota %v: %v %s", args, err, errb.String())
		}
		var v map[string]any
		if err := json.Unmarshal(out.Bytes(), &v); err != nil {
			t.Fatalf("azsim quota %v: %v: %s", args, err, out.String())
		}
		return v
	}
	v := quota()
	q := v["quota"].(map[string]any)
	if v["tier"] != "F1" || v["d2cRate"] != 100.0 || q["limit"] != 8000.0 || q["chunkBytes"] != 512.0 || q["used"] != 0.0 || q["resetsAt"] == nil {
		t.Fatalf("azsim quota: %v", v)
	}
	if q := quota("set-used", "8000")["quota"].(map[string]any); q["exhausted"] != true {
		t.Fatalf("after set-used 8000: %v", q)
	}
	if q := quota("clock", "set", "2030-01-01T23:59:00Z")["quota"].(map[string]any); q["day"] != "2030-01-01" || q["used"] != 0.0 {
		t.Fatalf("after clock set: %v", q)
	}
	if q := quota("clock", "advance", "1m")["quota"].(map[string]any); q["day"] != "2030-01-02" {
		t.Fatalf("after clock advance: %v", q)
	}
	var out, errb bytes.Buffer
	if err := run(context.Background(), []string{"quota", "--admin", az.Info.AdminURL, "set-used", "many"}, nil, &out, &errb); !errors.Is(err, errUsage) {
		t.Fatalf("set-used many: %v", err)
	}
}
