{{/*
Where Tandem's pods are: the watched namespaces, or any. And the relabelings both monitors share: the
ModelDeployment's name (app.kubernetes.io/instance) and the pod's role (app.kubernetes.io/component)
become the labels model_deployment and component, which the dashboard filters on.
*/}}
{{- define "tandem.monitorNamespaces" -}}
namespaceSelector:
{{- if .Values.watchNamespaces }}
  matchNames:
    {{- toYaml .Values.watchNamespaces | nindent 4 }}
{{- else }}
  any: true
{{- end }}
{{- end -}}

{{- define "tandem.monitorRelabelings" -}}
- sourceLabels: [__meta_kubernetes_pod_label_app_kubernetes_io_instance]
  targetLabel: model_deployment
- sourceLabels: [__meta_kubernetes_pod_label_app_kubernetes_io_component]
  targetLabel: component
{{- end -}}
