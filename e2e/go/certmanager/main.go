// Command cert-manager runs cert-manager's controller or its CA injector out of cluster,
// against the e2e test control plane, from the public packages of the published module
// github.com/cert-manager/cert-manager. Upstream's own cmd/controller and cmd/cainjector
// are separate modules that are not published, so this is a small launcher of our own.
//
//	cert-manager controller --kubeconfig=FILE [--readyz-listen-address=127.0.0.1:PORT] ...
//	cert-manager cainjector --kubeconfig=FILE [--readyz-listen-address=127.0.0.1:PORT] ...
//	cert-manager version
//
// The controller runs only what certificates from self-signed and CA issuers need: the
// Issuer and ClusterIssuer controllers, the certificates controllers, the
// CertificateRequest approver and the self-signed and CA CertificateRequest issuers.
// There is no ACME, Vault, Venafi, ingress or Gateway support and no leader election.
//
// GET /readyz on --readyz-listen-address answers 200 once the informer caches have synced
// (controller) or the manager's cache has synced (cainjector), and 503 before.
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/debug"
	"sort"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	apiext "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	kscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
	logsapi "k8s.io/component-base/logs/api/v1"
	apireg "k8s.io/kube-aggregator/pkg/apis/apiregistration/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	cmscheme "github.com/cert-manager/cert-manager/pkg/client/clientset/versioned/scheme"
	controllerpkg "github.com/cert-manager/cert-manager/pkg/controller"
	"github.com/cert-manager/cert-manager/pkg/controller/cainjector"
	logf "github.com/cert-manager/cert-manager/pkg/logs"

	// Controllers register themselves with pkg/controller when imported; issuer types
	// register themselves with pkg/issuer.
	crapprover "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/approver"
	crca "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/ca"
	crselfsigned "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/selfsigned"
	"github.com/cert-manager/cert-manager/pkg/controller/certificates/issuing"
	"github.com/cert-manager/cert-manager/pkg/controller/certificates/keymanager"
	"github.com/cert-manager/cert-manager/pkg/controller/certificates/readiness"
	"github.com/cert-manager/cert-manager/pkg/controller/certificates/requestmanager"
	"github.com/cert-manager/cert-manager/pkg/controller/certificates/revisionmanager"
	"github.com/cert-manager/cert-manager/pkg/controller/certificates/trigger"
	"github.com/cert-manager/cert-manager/pkg/controller/clusterissuers"
	"github.com/cert-manager/cert-manager/pkg/controller/issuers"
	_ "github.com/cert-manager/cert-manager/pkg/issuer/ca"
	_ "github.com/cert-manager/cert-manager/pkg/issuer/selfsigned"
)

const certManagerModule = "github.com/cert-manager/cert-manager"

// The controllers this launcher runs (all of them must be registered by the imports above).
var controllers = []string{
	issuers.ControllerName,
	clusterissuers.ControllerName,
	crapprover.ControllerName,
	crca.CRControllerName,
	crselfsigned.CRControllerName,
	trigger.ControllerName,
	issuing.ControllerName,
	keymanager.ControllerName,
	requestmanager.ControllerName,
	readiness.ControllerName,
	revisionmanager.ControllerName,
}

func usage() {
	fmt.Fprintf(os.Stderr, "usage: %s controller|cainjector|version [flags]   (--help for flags)\n", os.Args[0])
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	var err error
	switch sub, args := os.Args[1], os.Args[2:]; sub {
	case "controller":
		err = runController(args)
	case "cainjector":
		err = runCAInjector(args)
	case "version":
		fmt.Println(moduleVersion())
	default:
		usage()
		os.Exit(2)
	}
	logf.FlushLogs()
	if errors.Is(err, pflag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "cert-manager %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

// moduleVersion is the version of the cert-manager module this binary was built from.
func moduleVersion() string {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range info.Deps {
			if dep.Path == certManagerModule {
				return certManagerModule + " " + dep.Version
			}
		}
	}
	return certManagerModule + " (unknown version)"
}

// common holds the flags both subcommands take.
type common struct {
	kubeconfig string
	readyzAddr string
	qps        float32
	burst      int
	logging    *logsapi.LoggingConfiguration
}

func (c *common) addFlags(fs *pflag.FlagSet) {
	fs.StringVar(&c.kubeconfig, "kubeconfig", "", "path to the kubeconfig of the cluster (required)")
	fs.StringVar(&c.readyzAddr, "readyz-listen-address", "", "host:port for GET /readyz (off when empty)")
	fs.Float32Var(&c.qps, "kube-api-qps", 50, "client queries per second to kube-apiserver")
	fs.IntVar(&c.burst, "kube-api-burst", 100, "client burst to kube-apiserver")
	c.logging = logsapi.NewLoggingConfiguration()
	logf.AddFlags(c.logging, fs)
}

func (c *common) parse(fs *pflag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if c.kubeconfig == "" {
		return errors.New("--kubeconfig is required")
	}
	logf.InitLogs()
	return logf.ValidateAndApply(c.logging)
}

// signalContext is cancelled on SIGINT or SIGTERM.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

// serveReadyz answers GET /readyz with 200 once ready is set. It returns when ctx ends.
func serveReadyz(ctx context.Context, addr string, ready *atomic.Bool) (func() error, error) {
	if addr == "" {
		return func() error { <-ctx.Done(); return nil }, nil
	}
	lc := net.ListenConfig{}
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if ready.Load() {
			_, _ = w.Write([]byte("ok"))
			return
		}
		http.Error(w, "not ready", http.StatusServiceUnavailable)
	})
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) })
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdown)
	}()
	return func() error {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	}, nil
}

func runController(args []string) error {
	fs := pflag.NewFlagSet("controller", pflag.ContinueOnError)
	var c common
	c.addFlags(fs)
	clusterResourceNamespace := fs.String("cluster-resource-namespace", "kube-system",
		"namespace of the Secrets that ClusterIssuers refer to")
	namespace := fs.String("namespace", "", "watch only this namespace (all when empty; ClusterIssuers need all)")
	workers := fs.Int("concurrent-workers", 5, "workers per controller")
	if err := c.parse(fs, args); err != nil {
		return err
	}

	ctx, stop := signalContext()
	defer stop()
	log := logf.Log.WithName("controller")
	ctx = logf.NewContext(ctx, log)
	log.Info("starting cert-manager controller (vm-dhcp e2e launcher)", "module", moduleVersion())

	factory, err := controllerpkg.NewContextFactory(ctx, controllerpkg.ContextOptions{
		Kubeconfig:         c.kubeconfig,
		KubernetesAPIQPS:   c.qps,
		KubernetesAPIBurst: c.burst,
		Namespace:          *namespace,
		IssuerOptions: controllerpkg.IssuerOptions{
			ClusterResourceNamespace: *clusterResourceNamespace,
		},
		CertificateOptions: controllerpkg.CertificateOptions{
			// cert-manager's defaults: copy every annotation but the tools' own.
			CopiedAnnotationPrefixes: []string{
				"*", "-kubectl.kubernetes.io/", "-fluxcd.io/", "-argocd.argoproj.io/",
			},
			CertificateRequestMinimumBackoffDuration: time.Hour,
		},
	})
	if err != nil {
		return fmt.Errorf("building the controller context: %w", err)
	}
	base, err := factory.Build()
	if err != nil {
		return fmt.Errorf("building the controller context: %w", err)
	}

	known := controllerpkg.Known()
	names := make([]string, 0, len(known))
	for n := range known {
		names = append(names, n)
	}
	sort.Strings(names)
	log.Info("registered controllers", "names", names, "running", controllers)

	var ready atomic.Bool
	serve, err := serveReadyz(ctx, c.readyzAddr, &ready)
	if err != nil {
		return err
	}
	errs := make(chan error, len(controllers)+1)
	running := 0
	go func() { errs <- serve() }()
	running++
	for _, name := range controllers {
		construct, ok := known[name]
		if !ok {
			return fmt.Errorf("controller %q is not registered", name)
		}
		iface, err := construct(factory)
		if err != nil {
			return fmt.Errorf("constructing controller %q: %w", name, err)
		}
		go func() {
			log.V(logf.InfoLevel).Info("starting controller", "controller", name)
			if err := iface.Run(*workers, ctx); err != nil {
				errs <- fmt.Errorf("controller %q: %w", name, err)
				return
			}
			errs <- nil
		}()
		running++
	}

	base.SharedInformerFactory.Start(ctx.Done())
	base.KubeSharedInformerFactory.Start(ctx.Done())
	base.HTTP01ResourceMetadataInformersFactory.Start(ctx.Done())
	go func() {
		if allSynced(base.SharedInformerFactory.WaitForCacheSync(ctx.Done())) &&
			allSynced(base.KubeSharedInformerFactory.WaitForCacheSync(ctx.Done())) {
			ready.Store(true)
			log.Info("informer caches synced: ready")
		}
	}()

	var first error
	for ; running > 0; running-- {
		if err := <-errs; err != nil && first == nil {
			first = err
			stop()
		}
	}
	base.SharedInformerFactory.Shutdown()
	base.KubeSharedInformerFactory.Shutdown()
	base.HTTP01ResourceMetadataInformersFactory.Shutdown()
	return first
}

func allSynced[K comparable](m map[K]bool) bool {
	for _, ok := range m {
		if !ok {
			return false
		}
	}
	return true
}

func runCAInjector(args []string) error {
	fs := pflag.NewFlagSet("cainjector", pflag.ContinueOnError)
	var c common
	c.addFlags(fs)
	namespace := fs.String("namespace", "", "inject only into objects of this namespace (all when empty)")
	if err := c.parse(fs, args); err != nil {
		return err
	}

	ctx, stop := signalContext()
	defer stop()
	log := logf.Log.WithName("cainjector")
	ctrl.SetLogger(logf.Log)
	ctx = logf.NewContext(ctx, log)
	log.Info("starting cert-manager cainjector (vm-dhcp e2e launcher)", "module", moduleVersion())

	restConfig, err := clientcmd.BuildConfigFromFlags("", c.kubeconfig)
	if err != nil {
		return fmt.Errorf("loading %s: %w", c.kubeconfig, err)
	}
	restConfig.QPS, restConfig.Burst = c.qps, c.burst
	restConfig.UserAgent = "cert-manager-cainjector/" + moduleVersion()

	scheme := runtime.NewScheme()
	utilruntime.Must(kscheme.AddToScheme(scheme))
	utilruntime.Must(cmscheme.AddToScheme(scheme))
	utilruntime.Must(apiext.AddToScheme(scheme))
	utilruntime.Must(apireg.AddToScheme(scheme))

	var namespaces map[string]cache.Config
	if *namespace != "" {
		namespaces = map[string]cache.Config{*namespace: {}}
	}
	mgr, err := ctrl.NewManager(restConfig, ctrl.Options{
		Scheme: scheme,
		Cache: cache.Options{
			ReaderFailOnMissingInformer: true,
			DefaultNamespaces:           namespaces,
		},
		// As upstream: Secrets are read directly, never cached whole.
		Client: client.Options{
			Cache: &client.CacheOptions{DisableFor: []client.Object{&corev1.Secret{}}},
		},
		LeaderElection: false,
		Metrics:        metricsserver.Options{BindAddress: "0"},
	})
	if err != nil {
		return fmt.Errorf("creating the manager: %w", err)
	}

	// The Certificate data source needs the Certificate CRD; wait for it like upstream.
	direct, err := client.New(restConfig, client.Options{Scheme: scheme, Mapper: mgr.GetRESTMapper()})
	if err != nil {
		return err
	}
	err = wait.PollUntilContextTimeout(ctx, 500*time.Millisecond, 5*time.Minute, true,
		func(ctx context.Context) (bool, error) {
			var crd apiext.CustomResourceDefinition
			err := direct.Get(ctx, types.NamespacedName{Name: "certificates.cert-manager.io"}, &crd)
			if apierrors.IsNotFound(err) {
				log.Info("waiting for the certificates.cert-manager.io CRD")
				return false, nil
			}
			return err == nil, err
		})
	if err != nil {
		return fmt.Errorf("waiting for the Certificate CRD: %w", err)
	}

	err = cainjector.RegisterAllInjectors(ctx, mgr, cainjector.SetupOptions{
		Namespace:                    *namespace,
		EnableCertificatesDataSource: true,
		EnabledReconcilersFor: map[string]bool{
			cainjector.MutatingWebhookConfigurationName:   true,
			cainjector.ValidatingWebhookConfigurationName: true,
			cainjector.APIServiceName:                     true,
			cainjector.CustomResourceDefinitionName:       true,
		},
	})
	if err != nil {
		return fmt.Errorf("registering the injectors: %w", err)
	}

	var ready atomic.Bool
	serve, err := serveReadyz(ctx, c.readyzAddr, &ready)
	if err != nil {
		return err
	}
	go func() {
		if err := serve(); err != nil {
			log.Error(err, "readyz server")
		}
	}()
	go func() {
		select {
		case <-ctx.Done():
			return
		case <-mgr.Elected():
		}
		if mgr.GetCache().WaitForCacheSync(ctx) {
			ready.Store(true)
			log.Info("manager cache synced: ready")
		}
	}()
	if err := mgr.Start(ctx); err != nil {
		return fmt.Errorf("running the manager: %w", err)
	}
	return nil
}
