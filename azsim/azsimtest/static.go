package azsimtest

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/keystore/softkey"
	"github.com/gwagent/gwagent/provisioning"
	"github.com/gwagent/gwagent/transport"
)

// FactoryDevice prepares a static-mode device in dir, as a factory would:
// a P-384 key file (dir/device.key), a certificate for deviceID signed by
// azsim's factory CA (dir/chain.pem, leaf first), and the device registered
// at the hub for CA authentication. It returns the key URI and chain path.
func (a *Azsim) FactoryDevice(t testing.TB, dir, deviceID string) (keyURI, chainPath string) {
	t.Helper()
	keyURI = "file:" + filepath.Join(dir, "device.key")
	signer, err := softkey.New().CreateKey(context.Background(), keystore.MustParse(keyURI))
	if err != nil {
		t.Fatal(err)
	}
	der, err := provisioning.CSR(signer, deviceID)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := a.Server.FactorySign(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	if err != nil {
		t.Fatal(err)
	}
	chainPath = filepath.Join(dir, "chain.pem")
	if err := os.WriteFile(chainPath, chain, 0o644); err != nil {
		t.Fatal(err)
	}
	if st := a.Admin("PUT", "/hub/devices/"+deviceID, map[string]any{"auth": "certificateAuthority"}, nil); st >= 300 {
		t.Fatalf("register device %s: %d", deviceID, st)
	}
	return keyURI, chainPath
}

// FactorySession connects to the hub as a new static device (FactoryDevice
// in a temporary directory) with gwagent's own hub session, and closes it
// when the test ends: a real session for a test to publish into.
func (a *Azsim) FactorySession(t testing.TB, deviceID string) *transport.Session {
	t.Helper()
	return a.Dial(t, a.FactoryConfig(t, deviceID))
}

// Dial dials a hub session with cfg and closes it when the test ends.
func (a *Azsim) Dial(t testing.TB, cfg transport.Config) *transport.Session {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := transport.Dial(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// FactoryConfig is the session configuration of a new static device
// (FactoryDevice in a temporary directory), for a test that changes it
// (another Host, such as a relay in front of the hub) before dialling.
func (a *Azsim) FactoryConfig(t testing.TB, deviceID string) transport.Config {
	t.Helper()
	keyURI, chainPath := a.FactoryDevice(t, t.TempDir(), deviceID)
	signer, err := softkey.New().Signer(context.Background(), keystore.MustParse(keyURI))
	if err != nil {
		t.Fatal(err)
	}
	pemChain, err := os.ReadFile(chainPath)
	if err != nil {
		t.Fatal(err)
	}
	var chain []*x509.Certificate
	for b, rest := pem.Decode(pemChain); b != nil; b, rest = pem.Decode(rest) {
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, c)
	}
	roots := x509.NewCertPool()
	bundle, _ := os.ReadFile(a.Info.TrustBundle)
	roots.AppendCertsFromPEM(bundle)
	return transport.Config{Host: a.Info.HubHostName, DeviceID: deviceID, Roots: roots, Signer: signer, Chain: chain}
}
