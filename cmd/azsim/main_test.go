package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"

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
