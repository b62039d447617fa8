package azsimtest

import (
	"context"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"

	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/keystore/softkey"
	"github.com/gwagent/gwagent/provisioning"
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
