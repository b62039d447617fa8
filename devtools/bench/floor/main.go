// Command floor is the binary-size reference for make bench: a program
// with gwagent's dependencies used the way gwagent uses them (paho over
// TLS with a client certificate, go-tpm over /dev/tpmrm0 and a socket,
// fsnotify, go-toml, X.509 requests and chains, JSON, slog) and nothing
// else. gwagent's CGO-free arm64 binary should be within 5% of it.
package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"log/slog"
	"os"
	"os/signal"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/fsnotify/fsnotify"
	tpm "github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"
	"github.com/google/go-tpm/tpm2/transport/linuxudstpm"
	"github.com/pelletier/go-toml/v2"
)

func main() {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	var cfg struct{ Host, Key string }
	b, _ := os.ReadFile(os.Args[1])
	if err := toml.Unmarshal(b, &cfg); err != nil {
		log.Error("config", "err", err)
	}
	var t transport.TPMCloser
	var err error
	if len(os.Args) > 2 {
		t, err = linuxudstpm.Open(os.Args[2])
	} else {
		t, err = linuxtpm.Open("/dev/tpmrm0")
	}
	if err == nil {
		rsp, err := tpm.CreatePrimary{PrimaryHandle: tpm.TPMRHOwner, InPublic: tpm.New2B(tpm.ECCSRKTemplate)}.Execute(t)
		if err == nil {
			cr, _ := tpm.Create{ParentHandle: tpm.AuthHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}, InPublic: tpm.New2B(tpm.ECCSRKTemplate)}.Execute(t)
			ld, _ := tpm.Load{ParentHandle: tpm.AuthHandle{Handle: rsp.ObjectHandle, Name: rsp.Name}, InPrivate: cr.OutPrivate, InPublic: cr.OutPublic}.Execute(t)
			sig, _ := tpm.Sign{KeyHandle: tpm.AuthHandle{Handle: ld.ObjectHandle, Name: ld.Name}, Digest: tpm.TPM2BDigest{Buffer: make([]byte, 48)}}.Execute(t)
			tpm.EvictControl{Auth: tpm.TPMRHOwner, ObjectHandle: &tpm.NamedHandle{Handle: ld.ObjectHandle, Name: ld.Name}, PersistentHandle: tpm.TPMHandle(0x81000100)}.Execute(t)
			tpm.ReadPublic{ObjectHandle: tpm.TPMHandle(0x81000001)}.Execute(t)
			tpm.GetCapability{Capability: tpm.TPMCapECCCurves}.Execute(t)
			tpm.FlushContext{FlushHandle: rsp.ObjectHandle}.Execute(t)
			json.NewEncoder(os.Stdout).Encode(sig)
		}
		t.Close()
	}
	key, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cfg.Key}}, key)
	os.Stdout.Write(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr}))
	chain, _ := os.ReadFile(cfg.Key)
	blk, _ := pem.Decode(chain)
	var certs []*x509.Certificate
	if blk != nil {
		c, _ := x509.ParseCertificate(blk.Bytes)
		certs = append(certs, c)
	}
	roots, _ := x509.SystemCertPool()
	if len(certs) > 0 {
		certs[0].Verify(x509.VerifyOptions{Roots: roots})
	}
	w, err := fsnotify.NewWatcher()
	if err == nil {
		w.Add(os.TempDir())
	}
	opts := mqtt.NewClientOptions().AddBroker("tls://" + cfg.Host).SetClientID(cfg.Key).
		SetTLSConfig(&tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots, Certificates: []tls.Certificate{{PrivateKey: key}}}).
		SetProtocolVersion(4).SetAutoReconnect(false).SetOnConnectHandler(func(c mqtt.Client) {
		c.Subscribe("$iothub/twin/res/#", 0, func(mqtt.Client, mqtt.Message) {})
	})
	c := mqtt.NewClient(opts)
	tok := c.Connect()
	tok.WaitTimeout(time.Second)
	c.Publish("devices/x/messages/events/", 1, false, []byte("{}")).WaitTimeout(time.Second)
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt)
	c.Disconnect(0)
	log.Info("done")
}
