package main

// TPM attestation next to X.509 onboarding: TPM commands and time for one
// provisioning (new P-384 operational key in the TPM, CSR, registration,
// validated chain), on a swtpm of its own.

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	tpm "github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"

	"github.com/gwagent/gwagent/azsim/dps"
	"github.com/gwagent/gwagent/internal/tlsconf"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/keystore/tpm2"
	"github.com/gwagent/gwagent/provisioning"
)

// countingTPM counts commands by code and the time spent in the TPM.
type countingTPM struct {
	transport.TPMCloser
	cmds  map[tpm.TPMCC]int
	inTPM time.Duration
}

func (c *countingTPM) Send(cmd []byte) ([]byte, error) {
	t0 := time.Now()
	rsp, err := c.TPMCloser.Send(cmd)
	c.inTPM += time.Since(t0)
	if len(cmd) >= 10 {
		c.cmds[tpm.TPMCC(binary.BigEndian.Uint32(cmd[6:10]))]++
	}
	return rsp, err
}

func (c *countingTPM) reset() { c.cmds, c.inTPM = map[tpm.TPMCC]int{}, 0 }

func (c *countingTPM) summary() (int, string) {
	n := 0
	var parts []string
	for cc, k := range c.cmds {
		n += k
		parts = append(parts, fmt.Sprintf("%s×%d", ccName(cc), k))
	}
	sort.Strings(parts)
	return n, strings.Join(parts, " ")
}

func ccName(cc tpm.TPMCC) string {
	names := map[tpm.TPMCC]string{tpm.TPMCCCreatePrimary: "CreatePrimary", tpm.TPMCCCreate: "Create", tpm.TPMCCLoad: "Load",
		tpm.TPMCCFlushContext: "Flush", tpm.TPMCCSign: "Sign", tpm.TPMCCReadPublic: "ReadPublic", tpm.TPMCCGetCapability: "GetCapability",
		tpm.TPMCCStartAuthSession: "StartAuthSession", tpm.TPMCCPolicySecret: "PolicySecret", tpm.TPMCCActivateCredential: "ActivateCredential",
		tpm.TPMCCImport: "Import", tpm.TPMCCHMAC: "HMAC", tpm.TPMCCNVReadPublic: "NVReadPublic",
		tpm.TPMCCContextSave: "ContextSave", tpm.TPMCCContextLoad: "ContextLoad"}
	if s, ok := names[cc]; ok {
		return s
	}
	return fmt.Sprintf("0x%x", uint32(cc))
}

func (b *bench) tpmAttestation() ([]row, error) {
	dir, err := os.MkdirTemp("", "gwbench-tpm")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "tpm.sock")
	sw := exec.Command("swtpm", "socket", "--tpm2", "--server", "type=unixio,path="+sock, "--ctrl",
		"type=unixio,path="+filepath.Join(dir, "ctrl.sock"), "--tpmstate", "dir="+dir, "--flags", "not-need-init,startup-clear")
	if err := sw.Start(); err != nil {
		return nil, fmt.Errorf("swtpm: %w", err)
	}
	defer func() { sw.Process.Kill(); sw.Wait() }()
	var tr transport.TPMCloser
	for range 100 {
		if tr, err = linuxudstpm.Open(sock); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return nil, err
	}
	ct := &countingTPM{TPMCloser: tr}
	ct.reset()
	st, err := tpm2.New(ct, sock)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	roots, err := tlsconf.LoadPool(b.info.TrustBundle)
	if err != nil {
		return nil, err
	}
	uri := func(name string) *keystore.URI {
		return keystore.MustParse("tpm2:socket=" + sock + ";blob=" + filepath.Join(dir, name+".tpmkey"))
	}

	// X.509: the factory made the onboarding key and installed its chain.
	onKey, err := st.CreateKey(ctx, uri("onboarding"))
	if err != nil {
		return nil, err
	}
	der, err := provisioning.CSR(onKey, "bench-x509-tpm")
	if err != nil {
		return nil, err
	}
	chain, err := b.az.FactorySign(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	if err != nil {
		return nil, err
	}
	onChain, err := parseChain(chain)
	if err != nil {
		return nil, err
	}
	run := func(name string, cfg provisioning.DPSConfig) (time.Duration, error) {
		ct.reset()
		t0 := time.Now()
		op, err := st.CreateKey(ctx, uri(name))
		if err != nil {
			return 0, err
		}
		_, err = provisioning.Obtain(ctx, cfg, op, time.Now(), nil)
		return time.Since(t0), err
	}
	x509Wall, err := run("op-x509", provisioning.DPSConfig{Endpoint: b.info.DPSAddr, IDScope: b.info.IDScope, RegistrationID: "bench-x509-tpm",
		Roots: roots, Credential: provisioning.X509Credential{Signer: onKey, Chain: onChain}})
	if err != nil {
		return nil, fmt.Errorf("x509 onboarding: %w", err)
	}
	xn, xcmds := ct.summary()
	xTPM := ct.inTPM

	// TPM attestation: the manufacturer enrolled the EK.
	e, err := st.Endorsement(ctx)
	if err != nil {
		return nil, err
	}
	regID := provisioning.TPMRegistrationID(e.Public)
	if err := b.az.DPS.PutTPMEnrollment(dpsTPMEnrollment(regID, e.Public)); err != nil {
		return nil, err
	}
	tpmWall, err := run("op-tpm", provisioning.DPSConfig{Endpoint: b.info.DPSHTTPSAddr, IDScope: b.info.IDScope, RegistrationID: regID,
		Roots: roots, Credential: provisioning.TPMCredential{TPM: st}, Transport: provisioning.TransportHTTPS})
	if err != nil {
		return nil, fmt.Errorf("TPM attestation: %w", err)
	}
	tn, tcmds := ct.summary()
	return []row{
		{"TPM commands per provisioning: X.509 onboarding (MQTT)", float64(xn), "cmds", "", "", xcmds},
		{"TPM commands per provisioning: TPM attestation (HTTPS)", float64(tn), "cmds", "", "", tcmds},
		{"time in the TPM per provisioning: X.509 onboarding", float64(xTPM.Milliseconds()), "ms", "", "", "swtpm"},
		{"time in the TPM per provisioning: TPM attestation", float64(ct.inTPM.Milliseconds()), "ms", "", "", "swtpm; RSA SRK derived once, EK at enrollment (not counted), both reloaded from saved contexts for the challenge"},
		{"provisioning wall time: X.509 onboarding", float64(x509Wall.Milliseconds()), "ms", "", "", "incl. azsim's 1 s retry-after"},
		{"provisioning wall time: TPM attestation", float64(tpmWall.Milliseconds()), "ms", "", "", "incl. azsim's 1 s retry-after"},
	}, nil
}

func dpsTPMEnrollment(regID string, ek []byte) dps.TPMEnrollment {
	return dps.TPMEnrollment{RegistrationID: regID, EndorsementKey: base64.StdEncoding.EncodeToString(ek), Enabled: true}
}

func parseChain(pemData []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for blk, rest := pem.Decode(pemData); blk != nil; blk, rest = pem.Decode(rest) {
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	return out, nil
}
